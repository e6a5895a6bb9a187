import math

import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.gls import GLS


def test_objective_is_the_geometric_mean():
    losses = torch.tensor([2.0, 8.0])
    assert math.isclose(GLS().combine(losses).item(), 4.0, rel_tol=1e-6)  # sqrt(16)


def test_weights_are_the_partial_derivatives():
    losses = torch.tensor([2.0, 8.0], requires_grad=True)
    GLS().combine(losses).backward()
    # ∂/∂L1 sqrt(L1 L2) = sqrt(L2 / L1) / 2 = 1.0; ∂/∂L2 = sqrt(L1 / L2) / 2 = 0.25
    assert torch.allclose(losses.grad, torch.tensor([1.0, 0.25]))
    assert torch.allclose(GLS().weights(losses), torch.tensor([1.0, 0.25]))


def test_scaling_one_loss_scales_the_objective_not_the_direction():
    losses = torch.tensor([2.0, 8.0, 0.5])
    scaled = losses * torch.tensor([10.0, 1.0, 1.0])
    ratio = GLS().combine(scaled) / GLS().combine(losses)
    assert math.isclose(ratio.item(), 10 ** (1 / 3), rel_tol=1e-5)


def test_permutation_single_task_and_non_positive_losses():
    losses = torch.tensor([1.0, 4.0, 2.0])
    order = torch.tensor([1, 2, 0])
    assert torch.allclose(GLS().weights(losses[order]), GLS().weights(losses)[order])
    assert torch.allclose(GLS().weights(torch.tensor([3.0])), torch.ones(1))
    with pytest.raises(ValueError):
        GLS().weights(torch.tensor([0.0, 1.0]))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(GLS(), lr=0.2, steps=300)
    assert final < 0.2 * initial


def test_tiny_and_huge_losses_neither_underflow_nor_overflow():
    # 40 equal losses: L = L_k and w_k = 1/K exactly, though prod_k L_k is 1e-400 or 1e400
    # (outside float64): the mean is taken in log space.
    for value in (1e-10, 1e10):
        losses = torch.full((40,), value, dtype=torch.float64)
        assert math.isclose(GLS().combine(losses).item(), value, rel_tol=1e-12)
        assert torch.allclose(GLS().weights(losses), torch.full((40,), 1 / 40, dtype=torch.float64))


def test_weights_are_detached():
    losses = torch.tensor([2.0, 8.0], requires_grad=True)
    assert not GLS().weights(losses * 1.0).requires_grad


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_combine_refuses_non_positive_losses(bad):
    with pytest.raises(ValueError):
        GLS().combine(torch.tensor([bad, 1.0]))
