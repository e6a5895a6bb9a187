import torch

from reference_impls.weighting.aligned_mtl import AlignedMTL, balance_matrix


def test_aligned_rows_have_equal_singular_values(grad_checks):
    # Ĝ = B G must have Gramian λ_R · (projection onto the row space): condition number 1.
    for k, d, rank, scale, seed in grad_checks.random_cases(40, max_tasks=8, max_dim=12):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        gram = grads @ grads.T
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        keep = eigenvalues > k * 2.3e-16 * eigenvalues.max()
        projection = eigenvectors[:, keep] @ eigenvectors[:, keep].T
        aligned = balance_matrix(gram) @ grads
        expected = eigenvalues[keep].min() * projection
        assert torch.allclose(aligned @ aligned.T, expected, atol=1e-7 * float(eigenvalues.max()))


def test_weights_are_balance_matrix_times_task_weights(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=1)
    balance = balance_matrix(grads @ grads.T)
    assert torch.allclose(AlignedMTL()(grads).weights, balance.sum(1))
    preference = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.allclose(AlignedMTL(preference)(grads).weights, balance @ preference)


def test_orthogonal_equal_norm_rows_are_left_alone():
    grads = 3.0 * torch.eye(4, dtype=torch.float64)[:3]
    assert torch.allclose(AlignedMTL()(grads).weights, torch.ones(3, dtype=torch.float64))


def test_dominating_gradient_is_shrunk_to_the_smallest_scale():
    grads = torch.diag(torch.tensor([100.0, 1.0], dtype=torch.float64))
    result = AlignedMTL()(grads)
    assert torch.allclose(result.update, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_scale_invariant_weights(grad_checks):
    grads = grad_checks.gradient_matrix(4, 7, seed=2)
    reference = AlignedMTL()(grads).weights
    for scale in (1e-10, 1e10):
        assert torch.allclose(AlignedMTL()(grads * scale).weights, reference, rtol=1e-8)


def test_float32_dependent_rows_give_the_float64_update(grad_checks):
    # A float32 Gramian of rank-2 rows has rounding eigenvalues near 1e-7·λ_max where the
    # true ones are 0: a cut-off at float64's eps keeps them as λ_R and shrinks the update.
    for k, d, rank in ((4, 1000, 2), (5, 10_000, 3)):
        grads = grad_checks.gradient_matrix(k, d, seed=k, rank=rank)
        reference = AlignedMTL()(grads).update
        single = AlignedMTL()(grads.float()).update.double()
        assert torch.allclose(single, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(AlignedMTL)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(AlignedMTL)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(AlignedMTL(), lr=0.05)
    assert final < 0.5 * initial


def test_noise_cutoff_is_k_eps_lambda_max_in_the_gramians_dtype():
    # Eigenvalues 2 (rows 0, 1 parallel), 1 (row 2), ε = 6e-7 (row 3) and 0. The cut-off is
    # K·eps·λ_max = 4 · 1.19e-7 · 2 = 9.5e-7 for float32: ε is noise, λ_R = 1, and B·1 is
    # v/√2 + e₂ with v = e₀ + e₁ (B w has no part along the dropped direction e₃).
    # In float64 ε is kept: λ_R = ε and B·1 = √ε (v/√2 + e₂) + e₃.
    eps = 6e-7
    gram = torch.zeros(4, 4, dtype=torch.float64)
    gram[:2, :2], gram[2, 2], gram[3, 3] = 1.0, 1.0, eps
    dropped = torch.tensor([0.5**0.5, 0.5**0.5, 1.0, 0.0])
    assert torch.allclose(AlignedMTL().weights_from_gramian(gram.float()), dropped, atol=1e-6, rtol=0)
    kept = torch.tensor([(eps / 2) ** 0.5, (eps / 2) ** 0.5, eps**0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(AlignedMTL().weights_from_gramian(gram), kept, atol=1e-12, rtol=0)


def test_all_zero_rows_keep_the_task_weights():
    # B = I when every row is zero: the weights are w itself (the update is zero anyway).
    preference = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    zeros = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(AlignedMTL()(zeros).weights, torch.ones(3, dtype=torch.float64))
    assert torch.equal(AlignedMTL(preference)(zeros).weights, preference)
