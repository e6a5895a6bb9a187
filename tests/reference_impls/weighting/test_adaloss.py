import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.adaloss import AdaLoss


def test_weights_match_hand_computation():
    ada = AdaLoss(momentum=0.5, uniform_mix=0.1)
    assert torch.equal(ada.weights(torch.tensor([4.0, 1.0])), torch.ones(2))  # no average yet
    ada.weights(torch.tensor([2.0, 3.0]))
    # averages: (0.5·4 + 0.5·2, 0.5·1 + 0.5·3) = (3, 2);  1/L̂ = (1/3, 1/2), max-normalised (2/3, 1)
    weights = ada.weights(torch.tensor([9.0, 9.0]))
    assert torch.allclose(weights, 0.9 * torch.tensor([2 / 3, 1.0]) + 0.1)


def test_momentum_weighs_the_old_average():
    """L̂ ← m L̂ + (1 − m) L with m = 0.8: a new loss moves the average by only a fifth."""
    ada = AdaLoss(momentum=0.8, uniform_mix=0.0)
    ada.weights(torch.tensor([1.0, 4.0]))
    ada.weights(torch.tensor([6.0, 4.0]))
    # averages: (0.8·1 + 0.2·6, 4) = (2, 4); 1/L̂ = (1/2, 1/4), max-normalised (1, 1/2)
    assert torch.allclose(ada.weights(torch.ones(2)), torch.tensor([1.0, 0.5]))


def test_balanced_losses_when_they_are_steady():
    # Steady losses on very different scales: every weighted loss w_k L_k is the same.
    ada = AdaLoss(uniform_mix=0.0)
    losses = torch.tensor([250.0, 0.3, 4.0])
    for _ in range(3):
        weights = ada.weights(losses)
    products = weights * losses
    assert torch.allclose(products, products[0].expand(3), rtol=1e-6)
    assert weights.max() == 1.0


def test_without_averaging_or_mixing_it_is_the_gradient_of_the_sum_of_log_losses():
    theta = torch.tensor([0.4, -0.7, 1.1], dtype=torch.float64)

    def losses_at(t):
        return torch.stack([1 + t[0] ** 2, 100 * (1 + (t[1] - t[2]) ** 2), 0.01 * (2 + t.sum() ** 2)])

    ada = AdaLoss(momentum=0.0, uniform_mix=0.0)
    ada.weights(losses_at(theta))  # the previous step had the same parameters
    t = theta.clone().requires_grad_()
    ada.combine(losses_at(t)).backward()
    t_log = theta.clone().requires_grad_()
    values = losses_at(t_log)
    torch.log(values).sum().backward()
    assert torch.allclose(t.grad, values.min().detach() * t_log.grad, rtol=1e-12)


def test_mixing_keeps_every_weight_at_least_gamma_and_zero_losses_are_finite():
    ada = AdaLoss(uniform_mix=0.2)
    ada.weights(torch.tensor([1e6, 1e-6, 0.0]))
    weights = ada.weights(torch.ones(3))
    assert torch.isfinite(weights).all() and (weights >= 0.2 - 1e-7).all() and weights.max() == 1.0


def test_permuting_tasks_permutes_weights():
    history = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.9, 1.5]), torch.tensor([0.5, 2.0, 1.0])]
    order = torch.tensor([2, 0, 1])
    ada, permuted = AdaLoss(), AdaLoss()
    for losses in history:
        weights, weights_permuted = ada.weights(losses), permuted.weights(losses[order])
    assert torch.allclose(weights_permuted, weights[order])


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(AdaLoss(), lr=0.05, steps=200)
    assert final < 0.2 * initial


def test_default_momentum_0_9_and_mix_0_07_as_in_the_authors_code():
    ada = AdaLoss()
    ada.weights(torch.tensor([1.0, 4.0], dtype=torch.float64))
    ada.weights(torch.tensor([3.0, 4.0], dtype=torch.float64))
    # averages: (0.9·1 + 0.1·3, 4) = (1.2, 4); 1/L̂ max-normalised: (1, 1.2/4 = 0.3)
    weights = ada.weights(torch.ones(2, dtype=torch.float64))
    assert torch.allclose(weights, 0.93 * torch.tensor([1.0, 0.3], dtype=torch.float64) + 0.07, rtol=1e-12)


def test_documented_ranges_of_momentum_and_mix_are_enforced():
    """0 <= momentum < 1 (momentum 1 would never move the average) and 0 <= γ <= 1, both ends
    of γ included: each bound is checked on its own."""
    for momentum, mix in [(0.0, 0.0), (0.999, 1.0), (0.5, 0.5)]:
        AdaLoss(momentum=momentum, uniform_mix=mix)
    for momentum, mix in [(1.0, 0.5), (1.5, 0.5), (-0.1, 0.5), (0.5, 1.5), (0.5, -0.1)]:
        with pytest.raises(ValueError):
            AdaLoss(momentum=momentum, uniform_mix=mix)
