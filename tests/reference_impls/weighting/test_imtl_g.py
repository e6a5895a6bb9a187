import pytest
import torch

from reference_impls.weighting.imtl_g import IMTLG


def assert_equal_projections(grads, update, tol=1e-9):
    units = grads / grads.norm(dim=1, keepdim=True)
    projections = units @ update
    assert torch.allclose(projections, projections[0].expand_as(projections), atol=tol * float(projections.abs().max()), rtol=0)


def test_equal_projections_onto_unit_gradients(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(60, max_tasks=8, max_dim=30):
        if k > d:
            continue
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        result = IMTLG()(grads)
        assert abs(float(result.weights.sum()) - 1) < 1e-10
        assert_equal_projections(grads, result.update)


def test_matches_the_paper_closed_form(grad_checks):
    grads = grad_checks.gradient_matrix(4, 10, seed=1)
    units = grads / grads.norm(dim=1, keepdim=True)
    D, U = grads[0] - grads[1:], units[0] - units[1:]
    tail = grads[0] @ U.T @ torch.linalg.inv(D @ U.T)  # α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹
    expected = torch.cat([1 - tail.sum(0, keepdim=True), tail])
    assert torch.allclose(IMTLG()(grads).weights, expected, atol=1e-10)


def test_wildly_different_scales_still_balance(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=2) * torch.tensor([[1e-6], [1.0], [1e6]], dtype=torch.float64)
    assert_equal_projections(grads, IMTLG()(grads).update, tol=1e-7)


def test_parallel_and_zero_rows():
    g = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    h = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    result = IMTLG()(torch.stack([g, 3 * g, h, torch.zeros(3, dtype=torch.float64)]))
    assert result.weights[3] == 0 and abs(float(result.weights.sum()) - 1) < 1e-12
    assert_equal_projections(torch.stack([g, 3 * g, h]), result.update)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(IMTLG)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(IMTLG)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(IMTLG(), lr=0.02)
    assert final < 0.5 * initial


def test_cholesky_route_agrees_with_the_pseudo_inverse(grad_checks):
    import numpy as np

    from reference_impls.weighting.imtl_g import solve_cosine_system

    # Independent rows take the Cholesky route; it must give the pseudo-inverse's answer,
    # from comfortable angles down to two rows 0.1° from (anti)parallel.
    g = grad_checks.gradient_matrix(1, 5, seed=0)[0]
    h = grad_checks.gradient_matrix(1, 5, seed=1)[0]
    cases = [grad_checks.gradient_matrix(k, 6, seed=k) for k in (2, 3, 5)]
    cases += [torch.stack([g, sign * g + 2e-3 * h]) for sign in (1, -1)]
    for grads in cases:
        n = grads.norm(dim=1, keepdim=True)
        cosine = ((grads / n) @ (grads / n).T).numpy()
        ones = np.ones(len(cosine))
        expected = np.linalg.pinv(cosine, rcond=1e-10, hermitian=True) @ ones
        assert np.allclose(solve_cosine_system(cosine, ones), expected, rtol=1e-8, atol=0)


def test_two_tasks_weigh_each_by_the_other_norm(grad_checks):
    # K = 2: C⁻¹1 = 1/(1 + ρ)·1, so α ∝ 1/n_k, i.e. α = (n_2, n_1)/(n_1 + n_2).
    for s in range(20):
        grads = grad_checks.gradient_matrix(2, 2 + s % 5, s, scale=10.0 ** (s % 7 - 3))
        norms = grads.norm(dim=1)
        assert torch.allclose(IMTLG()(grads).weights, norms.flip(0) / norms.sum(), rtol=1e-9)


def test_opposite_pair_gets_the_zero_combination(grad_checks):
    # C⁺1 is 0 or rounding noise (α ≈ ±1e-17), which must not be divided by (weights of ±1e15
    # otherwise). Only d = 0 has equal projections: α = (s, 1)/(1 + s) for g_2 = −s g_1.
    for seed in range(20):
        g = grad_checks.gradient_matrix(1, 4, seed=seed)[0]
        for scale in (3.0, 0.37, 7.1):
            result = IMTLG()(torch.stack([g, -scale * g]))
            expected = torch.tensor([scale, 1.0], dtype=torch.float64) / (1 + scale)
            assert torch.allclose(result.weights, expected, atol=1e-12), (seed, scale)
            assert float(result.update.norm()) <= 1e-12 * float(g.norm()), (seed, scale)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_gradients_get_the_float64_weights_when_rows_are_dependent(dtype, tolerance):
    """Rounding noise of a low-precision Gramian must not be inverted as a direction: three rows
    in a plane (one a combination, or a multiple, of the others) get float64's weights. In half
    precision 1000 eps is about 1, so the cut-off is capped (without the cap: errors of ~20)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randn(2, 20, generator=g, dtype=torch.float64)
        for grads in (torch.stack([a, b, a + 0.5 * b]), torch.stack([a, b, 3 * a]), torch.randn(3, 20, generator=g, dtype=torch.float64)):
            exact = IMTLG()(grads).weights
            rounded = IMTLG()(grads.to(dtype)).weights
            assert rounded.dtype == dtype
            assert torch.allclose(rounded.double(), exact, atol=tolerance), (dtype, rounded, exact)


def test_opposite_gradients_give_the_limit_of_nearly_opposite_ones(grad_checks):
    # As g_2 -> −s g_1 the update shrinks like the angle's distance from π (the projections can
    # only agree at 0): at the pseudo-inverse's cut-off and at exactly opposite rows it is 0, not
    # the least-squares direction (norm ~3.6 here) nor, for K = 2, the uniform weights' (g_1 − s g_1)/2.
    g, v, h = grad_checks.gradient_matrix(3, 6, seed=1)
    for s, others in ((1.0, [h]), (3.0, [h]), (3.0, [])):
        for eps in (1e-3, 1e-4, 1e-6, 1e-9, 0.0):
            grads = torch.stack([g, -s * g + eps * v, *others])
            result = IMTLG()(grads)
            assert float(result.update.norm()) <= 10 * eps * float(grads.norm(dim=1).max()) + 1e-12
            assert abs(float(result.weights.sum()) - 1) < 1e-12
        assert torch.allclose(result.weights[:2], torch.tensor([s, 1.0], dtype=torch.float64) / (1 + s), atol=1e-12)


def test_coplanar_gradients_give_the_limit_of_nearly_coplanar_ones(grad_checks):
    # Three unit gradients in a plane have no direction of equal non-zero projections (1 is not
    # in C's range): as the third row nears the plane the update shrinks to 0 and the weights
    # tend to the dependency a + 0.5b − (a + 0.5b), i.e. (2, 1, −2); the pseudo-inverse's
    # least-squares direction (norm ~3.4) was a jump, not that limit.
    a, b, v = grad_checks.gradient_matrix(3, 20, seed=0)
    for eps in (1e-3, 1e-4, 1e-6, 1e-9, 0.0):
        result = IMTLG()(torch.stack([a, b, a + 0.5 * b + eps * v]))
        assert float(result.update.norm()) <= 20 * eps * float(v.norm()) + 1e-12
    assert torch.allclose(result.weights, torch.tensor([2.0, 1.0, -2.0], dtype=torch.float64), atol=1e-9)


def weights_of(rows):
    return IMTLG()(torch.tensor(rows, dtype=torch.float64)).weights


def test_two_opposite_pairs_take_the_null_combination_nearest_to_the_inverse_norms():
    # g, −3g, h, −h with g = (1, 0), h = (0, 2): C's null space is spanned by (1, 1, 0, 0) and
    # (0, 0, 1, 1). Projecting 1/n = (1, 1/3, 1/2, 1/2) gives β = (2/3, 2/3, 1/2, 1/2), so
    # α = β/n = (2/3, 2/9, 1/4, 1/4), which sums to 25/18: weights (0.48, 0.16, 0.18, 0.18)
    # (projecting the ones instead would give (3/7, 1/7, 3/14, 3/14)).
    weights = weights_of([[1.0, 0.0], [-3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    expected = torch.tensor([0.48, 0.16, 0.18, 0.18], dtype=torch.float64)
    assert torch.allclose(weights, expected, atol=1e-12)


def test_no_normalised_solution_falls_back_to_uniform_weights():
    # All-zero rows; and g_1 = (1, 0), g_2 = (0, 1), g_3 = (g_1 + g_2)/2, where only d = 0 has
    # equal projections and its combinations α = (1, 1, −2)·t sum to 0: both give 1/K each.
    for rows in ([[0.0, 0.0]] * 3, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]):
        assert torch.allclose(weights_of(rows), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)


def test_more_tasks_than_dimensions_give_the_zero_update(grad_checks):
    # K > d generic rows: 1 is not in the range of the rank-d cosine matrix, so no direction
    # has equal non-zero projections and the only impartial update is d = 0 (the null
    # combination); a least-squares direction that merely comes close to 1 is not impartial.
    generator = torch.Generator().manual_seed(3)
    for k, d in [(3, 2), (4, 2), (4, 3), (5, 3), (6, 4)]:
        for _ in range(10):
            grads = torch.randn(k, d, generator=generator, dtype=torch.float64)
            result = IMTLG()(grads)
            assert float(result.update.norm()) <= 1e-9 * float(grads.norm(dim=1).max())
            assert abs(float(result.weights.sum()) - 1) < 1e-10


def test_nearly_coplanar_independent_rows_still_get_equal_projections(grad_checks):
    # Independent float64 rows, however close to a plane (smallest cosine eigenvalue ~1e-6
    # here), keep the exact closed form: every unit gradient gets the same non-zero projection.
    a, b, v = grad_checks.gradient_matrix(3, 20, seed=0)
    for eps in (1e-2, 1e-3):
        grads = torch.stack([a, b, a + 0.5 * b + eps * v])
        update = IMTLG()(grads).update
        units = grads / grads.norm(dim=1, keepdim=True)
        projections = units @ update
        assert float(projections.abs().min()) > 0
        assert torch.allclose(projections, projections[0].expand_as(projections), rtol=1e-7, atol=0)


def test_float32_rows_slightly_out_of_plane_keep_equal_projections():
    """A third float32 gradient 0.4 degrees out of the others' plane is a real direction (float32
    resolves ~1e-7): equal projections and float64's weights. A Gramian computed in float32
    needed a ~1e-4 eigenvalue cut-off and dropped it (weights 2 % off)."""
    generator = torch.Generator().manual_seed(0)
    a, b, n = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    grads = torch.stack([a, b, a + 0.5 * b + 0.01 * n]).float()
    result = IMTLG()(grads)
    assert result.weights.dtype == torch.float32
    rows = grads.double()
    projections = (rows / rows.norm(dim=1, keepdim=True)) @ result.update.double()
    assert torch.allclose(projections, projections[0].expand(3), rtol=1e-4, atol=0)
    torch.testing.assert_close(result.weights.double(), IMTLG()(rows).weights, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-4), (torch.float16, 2e-2),
                                              (torch.bfloat16, 5e-2)])
def test_weights_from_a_gramian_alone_keep_its_dtype(dtype, tolerance):
    """The GramianWeighting route (an all-reduced Gramian under torch.distributed) calls
    ``weights_from_gramian(G Gᵀ)`` without a cut-off and multiplies the rows by the result: the
    default cut-off is that of the Gramian's dtype, the weights come back in that dtype (even one
    NumPy lacks), and they are the float64 weights up to its rounding."""
    grads = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = IMTLG()(grads).weights
    rows = grads.to(dtype)
    weights = IMTLG().weights_from_gramian(rows @ rows.T)
    assert weights.dtype == dtype
    assert torch.allclose(weights.double(), exact, atol=tolerance, rtol=0)
    assert (weights @ rows).dtype == dtype
