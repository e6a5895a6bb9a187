import pytest
import torch

from reference_impls.weighting.ntkmtl import NTKMTL


def per_sample_gradients(scales, n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([s * torch.randn(n, d, generator=generator, dtype=torch.float64) for s in scales])


def test_rule_by_hand():
    grads = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    result = NTKMTL()(grads)
    # λ = (25, 1), Σλ = 26: w = (√(26/25), √26)
    expected = torch.tensor([(26 / 25) ** 0.5, 26**0.5], dtype=torch.float64)
    assert torch.allclose(result.weights, expected, rtol=1e-12)
    assert torch.allclose(result.update, expected @ grads, rtol=1e-12)


def test_scaled_kernels_share_their_top_eigenvalue():
    # Mini-batch form: the top eigenvalue of w_k² J_k J_kᵀ is Σ_j λ_j for every task,
    # checked with the spectral norm of J_k (σ_max² = λ_max), not the method's eigvalsh.
    jac = per_sample_gradients([0.01, 1.0, 30.0], n=5, d=12, seed=0)
    weights = NTKMTL().from_per_sample(jac).weights
    top = torch.linalg.matrix_norm(jac, ord=2) ** 2
    balanced = weights**2 * top
    assert torch.allclose(balanced, top.sum().expand(3), rtol=1e-10)


def test_every_task_contributes_the_same_norm(grad_checks):
    grads = grad_checks.gradient_matrix(4, 9, seed=1) * torch.tensor([[1e-3], [1.0], [5.0], [1e2]], dtype=torch.float64)
    weights = NTKMTL()(grads).weights
    contributions = (weights[:, None] * grads).norm(dim=1)
    assert torch.allclose(contributions, grads.norm().expand(4), rtol=1e-10)  # √(Σ_j ||g_j||²)


def test_update_direction_ignores_one_task_rescaling(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=2)
    reference = NTKMTL()(grads).update
    scaled = grads * torch.tensor([[1.0], [1e4], [1.0]], dtype=torch.float64)
    update = NTKMTL()(scaled).update
    assert torch.allclose(update / update.norm(), reference / reference.norm(), atol=1e-12)


def test_mini_batch_of_one_equals_the_matrix_form(grad_checks):
    grads = grad_checks.gradient_matrix(4, 6, seed=3)
    batch, matrix = NTKMTL().from_per_sample(grads[:, None, :]), NTKMTL()(grads)
    assert torch.allclose(batch.weights, matrix.weights) and torch.allclose(batch.update, matrix.update)


def test_mini_batch_update_uses_mean_gradients_and_top_eigenvalues():
    jac = per_sample_gradients([1.0, 3.0], n=4, d=6, seed=4)
    result = NTKMTL().from_per_sample(jac)
    top = torch.stack([torch.linalg.eigvalsh(j @ j.T).max() for j in jac])
    weights = (top.sum() / top).sqrt()
    assert torch.allclose(result.weights, weights, rtol=1e-10)
    assert torch.allclose(result.update, weights @ jac.mean(1), rtol=1e-10)
    # Not the n = 1 rule applied to the mean gradients: the kernel's spectrum matters.
    assert not torch.allclose(result.weights, NTKMTL()(jac.mean(1)).weights, rtol=1e-3)


def test_exponent_zero_is_equal_weighting(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=5)
    assert torch.allclose(NTKMTL(exponent=0.0)(grads).update, grads.sum(0))


def test_zero_task_gets_zero_weight(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=6)
    grads[1] = 0
    weights = NTKMTL()(grads).weights
    assert weights[1] == 0 and (weights[[0, 2]] > 0).all()


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(NTKMTL)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(NTKMTL)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(NTKMTL(), steps=30, lr=0.01)
    assert final < 0.5 * initial


def test_per_sample_float32_kernels_do_not_overflow_and_bad_shapes_are_refused():
    """Kernels of float32 gradients are formed in float64: entries of 1e20 (squares 1e40, past
    float32's range) next to entries of 1e-3 still give w_k = (Σλ / λ_k)^½, in float32."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    per_sample = (base * torch.tensor([1e20, 1e-3], dtype=torch.float64)[:, None, None]).float()
    wide = per_sample.double()
    top = torch.stack([torch.linalg.svdvals(wide[k])[0] ** 2 for k in range(2)])  # λ_k = σ_max²
    result = NTKMTL().from_per_sample(per_sample)
    assert result.weights.dtype == result.update.dtype == torch.float32
    torch.testing.assert_close(result.weights.double(), (top.sum() / top).sqrt(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError):
        NTKMTL().from_per_sample(torch.ones(2, 3))
