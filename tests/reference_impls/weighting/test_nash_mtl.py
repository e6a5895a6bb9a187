import pytest
import torch

from reference_impls.weighting.nash_mtl import NashMTL


def test_bargaining_equations_hold_to_tight_residual(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(60, max_tasks=10, max_dim=40):
        if k > d:
            continue  # dependent rows: existence not guaranteed
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        method = NashMTL()
        alpha = method(grads).weights
        gram = grads @ grads.T
        assert (alpha > 0).all()
        # Independent check of (G Gᵀ α)_k · α_k = 1, not the solver's own residual.
        assert torch.allclose(alpha * (gram @ alpha), torch.ones(k, dtype=torch.float64), atol=1e-10, rtol=0)
        assert method.last_solution.exact and method.last_solution.residual < 1e-10


def test_orthogonal_gradients_get_inverse_norm_weights():
    grads = torch.diag(torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64))
    alpha = NashMTL()(grads).weights
    assert torch.allclose(alpha, torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64), atol=1e-12)


def test_update_is_scale_invariant(grad_checks):
    grads = grad_checks.gradient_matrix(4, 10, seed=1)
    reference = NashMTL()(grads).update
    for scale in (1e-10, 1e10):
        assert torch.allclose(NashMTL()(grads * scale).update, reference, rtol=1e-9, atol=1e-12)


def test_single_task_is_the_unit_gradient(grad_checks):
    grads = grad_checks.gradient_matrix(1, 5, seed=2)
    assert torch.allclose(NashMTL()(grads).update, grads[0] / grads[0].norm())


def test_no_solution_is_flagged_and_finite():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    method = NashMTL()
    result = method(torch.stack([g, -g, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)]))
    # No direction improves every task: the disagreement point, i.e. the zero update.
    assert not method.last_solution.exact and torch.equal(result.update, torch.zeros(3, dtype=torch.float64))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(NashMTL)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(NashMTL)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(NashMTL(), lr=0.05)
    assert final < 0.5 * initial


def test_every_call_solves_its_own_gramian(grad_checks):
    # Each call must re-solve (the official default too; reusing α is an option there).
    method = NashMTL()
    method(grad_checks.gradient_matrix(3, 6, seed=5))
    grads = grad_checks.gradient_matrix(3, 6, seed=6)
    alpha = method(grads).weights
    assert torch.allclose(alpha * (grads @ grads.T @ alpha), torch.ones(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_nearly_opposite_gradients_still_have_a_bargaining_solution(grad_checks):
    # 0 lies just outside the hull of g, −g + εh (and h): a solution exists, with large α, and
    # must be returned, not replaced by the disagreement point (zero weights).
    g, h = grad_checks.gradient_matrix(2, 8, seed=0)
    for gap in (1e-3, 1e-4, 1e-5, 1e-6):
        for grads in (torch.stack([g, -g + gap * h]), torch.stack([g, -g + gap * h, h])):
            method = NashMTL()
            alpha = method(grads).weights
            assert method.last_solution.exact and (alpha > 0).all(), (gap, len(grads))
            gram = grads @ grads.T
            # (Mα)_k is a small difference of large terms: allow float64's rounding of it.
            floor = 4 * len(alpha) * torch.finfo(torch.float64).eps * float((alpha * (gram.abs() @ alpha)).max())
            assert float((alpha * (gram @ alpha) - 1).abs().max()) <= max(1e-10, floor) < 0.5


def test_the_tolerance_reaches_the_solver_and_no_solution_is_stored_before_a_call():
    """``tol`` is the residual max_k |α_k (Mα)_k − 1| at which Newton stops: a loose one stops it
    well before the default 1e-12 would; ``last_solution`` is None until the first solve."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    rows = rows * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    gramian = rows @ rows.T
    method = NashMTL(tol=1e-3)
    assert method.last_solution is None
    loose = method.solve(gramian)
    assert 1e-10 < loose.residual <= 1e-3
    alphas = loose.weights
    assert float((alphas * (gramian @ alphas) - 1).abs().max()) == pytest.approx(loose.residual, rel=1e-6)
    assert NashMTL().solve(gramian).residual <= 1e-12
