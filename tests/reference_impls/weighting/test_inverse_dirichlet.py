import warnings

import pytest
import torch

from reference_impls.weighting.ew_grad import EqualWeightingGradient
from reference_impls.weighting.inverse_dirichlet import InverseDirichlet


HAND_GRADS = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.5, 0.0, 0.5], [3.0, -3.0, 3.0, -3.0]], dtype=torch.float64)


def spread(grads: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row, written out."""
    centred = grads - grads.mean(dim=1, keepdim=True)
    return (centred**2).mean(dim=1).sqrt()


def test_first_step_matches_hand_computation():
    grads = HAND_GRADS
    result = InverseDirichlet(alpha=0.5)(grads)
    # spreads (1, 0.25, 3): λ̂ = (3, 12, 1); λ = 0.5 · 1 + 0.5 · λ̂
    expected = torch.tensor([2.0, 6.5, 1.0], dtype=torch.float64)
    assert torch.allclose(result.weights, expected)
    assert torch.allclose(result.update, expected @ grads)


def test_moving_average_equalises_the_weighted_spreads(grad_checks):
    grads = grad_checks.gradient_matrix(3, 12, seed=1) * torch.tensor([[1e-3], [1.0], [50.0]], dtype=torch.float64)
    target = spread(grads).max() / spread(grads)
    method = InverseDirichlet(alpha=0.3)
    for step in range(1, 4):  # λ_n = λ̂ + (1 - α)^n (1 - λ̂)
        assert torch.allclose(method(grads).weights, target + 0.7**step * (1 - target))
    for _ in range(100):
        weights = method(grads).weights
    weighted = weights[:, None] * grads
    assert torch.allclose(spread(weighted), spread(grads).max().expand(3), rtol=1e-12)
    assert weights[2] == 1  # the widest-spread task


def test_spread_ignores_offsets_and_overall_scale_but_not_row_scale(grad_checks):
    grads = grad_checks.gradient_matrix(3, 8, seed=2)
    base = InverseDirichlet()(grads).weights
    shifted = grads + torch.tensor([[5.0], [-2.0], [0.3]], dtype=torch.float64)  # a constant per row
    assert torch.allclose(InverseDirichlet()(shifted).weights, base)
    assert torch.allclose(InverseDirichlet()(1e8 * grads).weights, base)
    smallest = int(spread(grads).argmin())
    rescaled = grads.clone()
    rescaled[smallest] *= 0.1
    targets = 2 * InverseDirichlet()(rescaled).weights - 1  # λ̂ after one step from λ = 1
    assert torch.isclose(targets[smallest], 10 * (2 * base[smallest] - 1))


def test_alpha_zero_is_equal_weighting(grad_checks):
    grads = grad_checks.gradient_matrix(4, 6, seed=3)
    method = InverseDirichlet(alpha=0.0)
    for _ in range(3):
        result = method(grads)
    assert torch.allclose(result.update, EqualWeightingGradient()(grads).update)


def test_rows_without_spread_keep_their_weight(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=4)
    grads[1] = 0.0
    grads[2] = 7.0  # constant: no spread either
    weights = InverseDirichlet()(grads).weights
    assert torch.equal(weights, torch.ones(3, dtype=torch.float64))
    method = InverseDirichlet()
    method(grads)
    with pytest.raises(ValueError, match="3 tasks"):
        method(grad_checks.gradient_matrix(2, 5, seed=4))


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(InverseDirichlet)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(InverseDirichlet)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(InverseDirichlet(), lr=0.01)
    assert final < 0.5 * initial


def test_a_row_that_loses_its_spread_keeps_its_current_weight():
    method = InverseDirichlet()
    method(HAND_GRADS)  # λ = (2, 6.5, 1), as in the hand computation above
    grads = HAND_GRADS.clone()
    grads[1] = 0.0
    # spreads (1, —, 3): λ̂_0 = 3, so λ_0 = 0.5 · 2 + 0.5 · 3; row 1 keeps 6.5 (no decay, no reset)
    assert torch.equal(method(grads).weights, torch.tensor([2.5, 6.5, 1.0], dtype=torch.float64))


def test_a_single_parameter_gives_no_nan_and_no_warning():
    """The population std of one entry is 0 (no spread), not the sample std's 0/0."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = InverseDirichlet()(torch.tensor([[2.0], [-3.0]], dtype=torch.float64))
    assert torch.equal(result.weights, torch.ones(2, dtype=torch.float64))


def test_the_weights_are_constants_for_autograd():
    """λ comes from detached gradients: d(update)/d(row k) is λ_k, also on a later step."""
    method = InverseDirichlet()
    method(HAND_GRADS.clone().requires_grad_())
    grads = HAND_GRADS.clone().requires_grad_()
    result = method(grads)
    assert result.weights.grad_fn is None
    result.update.sum().backward()
    assert torch.equal(grads.grad, result.weights[:, None].expand(3, 4))


def test_a_call_where_no_row_has_spread_keeps_every_weight(grad_checks):
    method = InverseDirichlet(alpha=0.5)
    method(grad_checks.gradient_matrix(3, 5, seed=4))
    method(grad_checks.gradient_matrix(3, 5, seed=5))
    before = method.lambdas.clone()
    assert not torch.allclose(before, torch.ones(3, dtype=torch.float64))
    flat = torch.tensor([[0.0] * 5, [2.0] * 5, [-1.0] * 5], dtype=torch.float64)
    result = method(flat)
    assert torch.equal(method.lambdas, before)
    assert torch.equal(result.weights, before)


def test_gradients_of_no_parameters_keep_the_weights_at_one():
    # d = 0: no spread to measure, so λ stays at its start, 1 for every task.
    result = InverseDirichlet()(torch.zeros(3, 0, dtype=torch.float64))
    assert result.update.shape == (0,) and torch.equal(result.weights, torch.ones(3, dtype=torch.float64))
