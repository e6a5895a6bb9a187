import math

import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.uw import UW


def test_objective_matches_hand_computation():
    uw = UW(num_tasks=2)
    with torch.no_grad():
        uw.log_variances.copy_(torch.tensor([0.0, math.log(4.0)]))  # σ² = 1 and 4
    losses = torch.tensor([3.0, 8.0])
    # L1/(2·1) + log 1  +  L2/(2·4) + log 2  =  1.5 + 0 + 1.0 + log 2
    expected = 1.5 + 1.0 + math.log(2.0)
    assert math.isclose(uw.combine(losses).item(), expected, rel_tol=1e-6)
    assert torch.allclose(uw.weights(losses), torch.tensor([0.5, 0.125]))


def test_log_variance_gradient_matches_hand_computation():
    uw = UW(num_tasks=1)
    uw.combine(torch.tensor([3.0])).backward()
    # d/ds [0.5 e^-s L + 0.5 s] at s = 0 is -0.5 L + 0.5 = -1.0
    assert math.isclose(uw.log_variances.grad.item(), -1.0, rel_tol=1e-6)


def test_learned_variance_converges_to_the_loss():
    uw = UW(num_tasks=2)
    losses = torch.tensor([0.2, 5.0])
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(500):
        optimizer.zero_grad()
        uw.combine(losses).backward()
        optimizer.step()
    # optimum of 0.5 e^-s L + 0.5 s is s = log L, i.e. σ² = L and weight 1 / (2L)
    assert torch.allclose(uw.log_variances.exp(), losses, rtol=1e-3)
    assert torch.allclose(uw.weights(losses), 1 / (2 * losses), rtol=1e-3)


def test_permuting_tasks_permutes_weights_and_zero_losses_are_finite():
    uw = UW(num_tasks=3)
    with torch.no_grad():
        uw.log_variances.copy_(torch.tensor([0.1, -0.3, 0.7]))
    order = torch.tensor([2, 0, 1])
    permuted = UW(num_tasks=3)
    with torch.no_grad():
        permuted.log_variances.copy_(uw.log_variances[order])
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(permuted.weights(losses[order]), uw.weights(losses)[order])
    assert torch.isfinite(uw.combine(torch.zeros(3)))


def test_training_reduces_total_loss():
    # Adam, not SGD at lr 0.05: there this toy run is chaotic (seed 0 ends at 0.23 of the initial
    # loss in float32 and 0.14 in float64, and CPUs differ); with Adam seeds 0-5 all end below 0.03
    # in both precisions: train_with_weighting(UW(num_tasks=2), lr=0.01, steps=300, adam=True, seed=s).
    initial, final = train_with_weighting(UW(num_tasks=2), lr=0.01, steps=300, adam=True)
    assert final < 0.2 * initial


def test_weights_are_detached_and_combine_reaches_the_log_variances():
    uw = UW(num_tasks=2)
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not uw.weights(losses).requires_grad
    uw.combine(losses).backward()
    assert uw.log_variances.grad is not None
    assert torch.allclose(losses.grad, uw.weights(losses))


def test_init_log_variance_sets_the_starting_weights():
    # s = log 2 is σ² = 2, so the weight 1 / (2σ²) is 1/4
    uw = UW(num_tasks=2, init_log_variance=math.log(2.0))
    assert torch.allclose(uw.weights(torch.ones(2)), torch.full((2,), 0.25))
