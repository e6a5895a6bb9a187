import pytest
import torch

from reference_impls.weighting.ew_grad import EqualWeightingGradient
from reference_impls.weighting.lra import LRA


def ratio(grads: torch.Tensor) -> torch.Tensor:
    """max |g_1| / mean |g_k| for k = 2..K."""
    return grads[0].abs().max() / grads[1:].abs().mean(dim=1)


def test_first_step_matches_hand_computation():
    grads = torch.tensor([[4.0, -8.0, 2.0, 0.0], [0.5, -0.5, 1.0, 0.0], [0.0, 0.1, 0.0, -0.1]], dtype=torch.float64)
    result = LRA(beta=0.9)(grads)
    # max |g_1| = 8; mean |g_2| = 0.5, mean |g_3| = 0.05; λ starts at 1, so λ̂ = (16, 160)
    expected = torch.tensor([1.0, 0.9 + 0.1 * 16, 0.9 + 0.1 * 160], dtype=torch.float64)
    assert torch.allclose(result.weights, expected)
    assert torch.allclose(result.update, expected @ grads)


def test_fixed_gradients_settle_where_the_weighted_mean_matches_the_reference_max(grad_checks):
    # λ̂ divides by mean |λ g_k|, so the fixed point is λ² = max |g_1| / mean |g_k|.
    grads = grad_checks.gradient_matrix(3, 10, seed=4) * torch.tensor([[30.0], [1.0], [0.01]], dtype=torch.float64)
    method = LRA()
    for _ in range(200):
        weights = method(grads).weights
    assert torch.allclose(weights[1:], ratio(grads).sqrt(), rtol=1e-9)
    assert torch.allclose(weights[1:] * grads[1:].abs().mean(dim=1) * weights[1:], grads[0].abs().max().expand(2))


def test_beta_one_freezes_the_weights_at_equal_weighting(grad_checks):
    grads = grad_checks.gradient_matrix(4, 7, seed=5)
    method = LRA(beta=1.0)
    for _ in range(3):
        result = method(grads)
    assert torch.allclose(result.update, EqualWeightingGradient()(grads).update)


def test_scale_of_the_whole_matrix_drops_out_but_the_reference_scale_does_not(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=6)
    base = LRA()(grads).weights
    assert torch.allclose(LRA()(1e6 * grads).weights, base)
    scaled_reference = grads.clone()
    scaled_reference[0] *= 10
    targets = (LRA()(scaled_reference).weights[1:] - 0.9) / 0.1  # λ̂ after one step from λ = 1
    assert torch.allclose(targets, 10 * ratio(grads))


def test_permuting_the_other_tasks_permutes_their_weights(grad_checks):
    grads = grad_checks.gradient_matrix(4, 9, seed=7)
    order = torch.tensor([0, 3, 1, 2])  # row 0 stays the reference
    method, permuted = LRA(), LRA()
    for _ in range(3):
        a, b = method(grads), permuted(grads[order])
    assert torch.allclose(a.weights[order], b.weights)
    assert torch.allclose(a.update, b.update)
    assert not torch.allclose(LRA()(grads[[1, 0, 2, 3]]).update, LRA()(grads).update)  # row 0 is special


def test_zero_gradient_keeps_its_weight_and_task_count_is_fixed(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=8)
    grads[2] = 0
    method = LRA()
    method(grads)
    weights = method(grads).weights
    assert weights[2] == 1 and weights[1] > 1
    moved = LRA()
    before = moved(grad_checks.gradient_matrix(3, 5, seed=8)).weights[2]
    assert moved(grads).weights[2] == before != 1  # a learnt λ is kept, not reset, while g_k = 0
    with pytest.raises(ValueError, match="3 tasks"):
        method(grad_checks.gradient_matrix(4, 5, seed=8))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(LRA)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(LRA(), lr=0.01)
    assert final < 0.5 * initial


def test_empty_gradients_keep_the_lambdas():
    """With d = 0 there is no max or mean to take: no ratio is defined, every λ_k stays put."""
    method = LRA()
    for _ in range(2):
        result = method(torch.zeros(4, 0, dtype=torch.float64))
        assert result.update.shape == (0,)
        assert torch.equal(result.weights, torch.ones(4, dtype=torch.float64))
    assert torch.equal(method.lambdas, torch.ones(3, dtype=torch.float64))
