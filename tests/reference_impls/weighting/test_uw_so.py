import math

import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.uw import UW
from reference_impls.weighting.uw_so import UWSO


def test_weights_match_hand_computation():
    weights = UWSO(temperature=2.0, eps=0.0).weights(torch.tensor([0.5, 1.0, 4.0]))
    # logits 1/(T L) = (1, 0.5, 0.125)
    logits = [1.0, 0.5, 0.125]
    total = sum(math.exp(v) for v in logits)
    expected = torch.tensor([math.exp(v) / total for v in logits])
    assert torch.allclose(weights, expected, atol=1e-7)
    assert weights[0] > weights[1] > weights[2]  # the smallest loss gets the largest weight


def test_uw_o_is_the_optimum_that_uw_learns_slowly():
    # UW's joint loss 0.5 e^-s L + 0.5 s is minimised at e^s = L, weight 1/(2L): the same
    # inverse-loss weights as UW-O up to the constant 2, reached here only after 500 steps.
    losses = torch.tensor([0.2, 1.5, 5.0])
    uw = UW(num_tasks=3)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(500):
        optimizer.zero_grad()
        uw.combine(losses).backward()
        optimizer.step()
    uw_o = UWSO(soft=False, eps=0.0).weights(losses)
    assert torch.allclose(uw_o, 1 / losses)
    assert torch.allclose(uw.weights(losses), 0.5 * uw_o, rtol=1e-3)
    assert not torch.allclose(UW(num_tasks=3).weights(losses), 0.5 * uw_o, rtol=0.1)  # UW at step 0


def test_uw_o_gradient_is_that_of_the_log_losses_so_loss_scale_drops_out():
    prediction = torch.tensor([0.3, -0.2], requires_grad=True)
    grads = []
    for scale in (1.0, 1000.0):
        losses = torch.stack([scale * (prediction[0] - 1) ** 2, (prediction[1] + 2) ** 2])
        (grad,) = torch.autograd.grad(UWSO(soft=False, eps=0.0).combine(losses), prediction)
        grads.append(grad)
    expected = torch.tensor([2 / (0.3 - 1), 2 / (-0.2 + 2)])  # ∇ log (p - t)² = 2 / (p - t)
    assert torch.allclose(grads[0], expected) and torch.allclose(grads[1], expected)


def test_temperature_limits_are_equal_weighting_and_argmin():
    losses = torch.tensor([0.3, 0.8, 2.0, 0.31], dtype=torch.float64)
    assert torch.allclose(UWSO(temperature=1e6).weights(losses), torch.full((4,), 0.25, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(UWSO(temperature=1e-3).weights(losses), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))


def test_weights_sum_to_one_and_carry_no_gradient():
    losses = torch.tensor([0.7, 2.0, 3.5], requires_grad=True)
    uw_so = UWSO(temperature=0.5)
    weights = uw_so.weights(losses)
    assert not weights.requires_grad and math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(uw_so.combine(losses), losses)
    assert torch.allclose(grad, weights)  # d/dL Σ w L = w: weights are constants


def test_permutation_single_task_and_zero_losses():
    losses = torch.tensor([1.0, 0.2, 3.0])
    order = torch.tensor([2, 0, 1])
    uw_so = UWSO()
    assert torch.allclose(uw_so.weights(losses[order]), uw_so.weights(losses)[order])
    assert torch.allclose(uw_so.weights(torch.tensor([4.0])), torch.ones(1))
    for zeros in (torch.zeros(3), torch.tensor([0.0, 1.0, 2.0])):
        assert torch.isfinite(uw_so.weights(zeros)).all() and torch.isfinite(uw_so.combine(zeros))
    assert torch.allclose(uw_so.weights(torch.zeros(3)), torch.full((3,), 1 / 3))


def test_training_reduces_total_loss():
    # T matters: at T = 1 the small task's loss soon has 1/L far above the other's, the
    # softmax gives it nearly all the weight and the 10x larger task stalls (~25 of 35).
    initial, final = train_with_weighting(UWSO(temperature=5.0), lr=0.05, steps=300)
    assert final < 0.2 * initial


def test_eps_is_added_to_every_loss_before_inverting():
    weights = UWSO(soft=False, eps=0.5).weights(torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([1 / 1.5, 1 / 0.5, 1 / 3.0], dtype=torch.float64))


def test_constructor_defaults_and_a_non_positive_temperature():
    # defaults T = 1 and ε = 1e-8: a zero loss has the logit 1e8 exactly; logits 1/L at T = 1
    torch.testing.assert_close(UWSO(soft=False).weights(torch.zeros(1, dtype=torch.float64)),
                               torch.tensor([1e8], dtype=torch.float64))
    losses = torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(UWSO().weights(losses), torch.softmax(torch.tensor([2.0, 1.0], dtype=torch.float64), 0))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError):
            UWSO(temperature=temperature)
