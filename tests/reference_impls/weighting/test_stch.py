import math

import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.stch import STCH


def test_value_matches_hand_computation():
    losses = torch.tensor([1.0, 2.0])
    # μ log(e^{1/μ} + e^{2/μ}) with μ = 1
    expected = math.log(math.e + math.e**2)
    assert math.isclose(STCH(mu=1.0).combine(losses).item(), expected, rel_tol=1e-6)


def test_tends_to_the_max_as_mu_shrinks():
    losses = torch.tensor([0.3, 2.5, 1.7])
    gaps = [STCH(mu=mu).combine(losses).item() - 2.5 for mu in (1.0, 0.1, 0.01, 0.001)]
    assert all(0 <= gap <= mu * math.log(3) + 1e-6 for gap, mu in zip(gaps, (1.0, 0.1, 0.01, 0.001)))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5
    weights = STCH(mu=0.001).weights(losses)
    assert torch.allclose(weights, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_weights_are_the_gradient_and_respect_preference_and_reference():
    preference = torch.tensor([0.2, 0.8])
    reference = torch.tensor([0.5, -1.0])
    stch = STCH(mu=0.5, preference=preference, reference=reference)
    losses = torch.tensor([1.5, 0.5], requires_grad=True)
    stch.combine(losses).backward()
    assert torch.allclose(stch.weights(losses), losses.grad)
    # λ (L - z*) = (0.2, 1.2): the second task dominates
    assert losses.grad[1] > losses.grad[0]


def test_permutation_single_task_and_zero_losses():
    losses = torch.tensor([1.0, 3.0, 2.0])
    order = torch.tensor([2, 0, 1])
    assert torch.allclose(STCH().weights(losses[order]), STCH().weights(losses)[order])
    assert torch.allclose(STCH().weights(torch.tensor([4.0])), torch.ones(1))
    assert torch.allclose(STCH().weights(torch.zeros(2)), torch.full((2,), 0.5))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(STCH(mu=1.0), lr=0.05, steps=300)
    assert final < 0.2 * initial


def test_the_gap_bound_is_mu_log_k_and_is_reached_when_all_gaps_tie():
    # g_μ = μ log(K e^{c/μ}) = c + μ log K exactly when every λ_k (L_k - z_k*) equals c
    stch = STCH(mu=0.5)
    assert math.isclose(stch.gap_bound(3), 0.5 * math.log(3))
    tied = torch.full((3,), 2.0, dtype=torch.float64)
    assert math.isclose(stch.combine(tied).item() - 2.0, stch.gap_bound(3), rel_tol=1e-12)


def test_weights_are_detached():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not STCH().weights(losses).requires_grad


def test_preference_and_reference_by_hand():
    # λ = (0.2, 0.8), z* = (0.5, −1), L = (1.5, 0.5), μ = 0.5: λ(L − z*) = (0.2, 1.2), so
    # g = 0.5 log(e^0.4 + e^2.4) and w = λ ⊙ softmax((0.4, 2.4)).
    stch = STCH(mu=0.5, preference=torch.tensor([0.2, 0.8], dtype=torch.float64),
                reference=torch.tensor([0.5, -1.0], dtype=torch.float64))
    losses = torch.tensor([1.5, 0.5], dtype=torch.float64)
    assert math.isclose(stch.combine(losses).item(), 0.5 * math.log(math.exp(0.4) + math.exp(2.4)), rel_tol=1e-12)
    soft = torch.tensor([math.exp(0.4), math.exp(2.4)], dtype=torch.float64) / (math.exp(0.4) + math.exp(2.4))
    torch.testing.assert_close(stch.weights(losses), torch.tensor([0.2, 0.8], dtype=torch.float64) * soft)


def test_default_mu_is_one_and_results_keep_the_losses_dtype():
    assert math.isclose(STCH().combine(torch.tensor([1.0, 2.0])).item(), math.log(math.e + math.e**2), rel_tol=1e-6)
    stch = STCH(preference=torch.tensor([0.2, 0.8], dtype=torch.float64),
                reference=torch.tensor([0.5, -1.0], dtype=torch.float64))
    losses = torch.tensor([1.5, 0.5], dtype=torch.float32)
    assert stch.weights(losses).dtype == stch.combine(losses).dtype == torch.float32
