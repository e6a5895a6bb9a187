from unittest import mock

import pytest
import torch

from reference_impls.weighting.cagrad import CAGrad


def dual_objective(gram, w, mean, radius):
    return float(w @ gram @ mean + radius * (w @ gram @ w).clamp_min(0).sqrt())


def test_c_zero_is_the_mean(grad_checks):
    grads = grad_checks.gradient_matrix(5, 9, seed=0)
    result = CAGrad(c=0.0)(grads)
    assert torch.equal(result.weights, torch.full((5,), 0.2, dtype=torch.float64))
    assert torch.allclose(result.update, grads.mean(0))


def test_primal_dual_certificate(grad_checks):
    # d is feasible (||d − g0|| = c||g0||) and min_k g_k·d equals the dual value F(w*):
    # equal primal and dual values certify that both are optimal.
    for k, d, rank, scale, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=10, seed=1):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        gram = grads @ grads.T / scale**2
        for c in (0.2, 0.5, 2.0):
            method = CAGrad(c=c)
            weights, _ = method.solve_dual(gram)
            mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
            radius = c * float(mean @ gram @ mean) ** 0.5
            aggregation = method(grads / scale)
            update = aggregation.update
            value = dual_objective(gram, weights, mean, radius)
            tol = 1e-7 * float(gram.diagonal().max())
            if float(weights @ gram @ weights) < 1e-12 * float(gram.diagonal().max()):
                continue  # 0 in the hull is optimal: documented fallback, no certificate
            assert abs(float((update - grads.mean(0) / scale).norm()) - radius) <= 1e-7 * max(radius, 1e-300) + 1e-12
            assert float((grads / scale @ update).min()) >= value - tol
            active = weights > 1e-9
            assert torch.allclose((grads / scale @ update)[active], torch.full((int(active.sum()),), value, dtype=torch.float64), atol=tol)


def test_dual_solution_beats_random_simplex_points(grad_checks):
    grads = grad_checks.gradient_matrix(4, 3, seed=2)
    gram = grads @ grads.T
    mean = torch.full((4,), 0.25, dtype=torch.float64)
    radius = 0.5 * float(mean @ gram @ mean) ** 0.5
    weights, _ = CAGrad(c=0.5).solve_dual(gram / gram.diagonal().max())
    best = dual_objective(gram, weights, mean, radius)
    samples = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((5000,))
    values = samples @ gram @ mean + radius * ((samples @ gram) * samples).sum(1).sqrt()
    assert best <= float(values.min()) + 1e-12


def test_single_task_scales_by_one_plus_c(grad_checks):
    # g0 = g and the ball's far point along g is (1 + c) g; c = 1 gives a radius of exactly 1 (normalised)
    grads = grad_checks.gradient_matrix(1, 5, seed=3)
    for c in (0.4, 1.0, 3.0):
        assert torch.allclose(CAGrad(c=c)(grads).update, (1 + c) * grads[0]), c


def test_scale_invariant_weights(grad_checks):
    grads = grad_checks.gradient_matrix(4, 6, seed=4)
    reference = CAGrad()(grads).weights
    for scale in (1e-10, 1e10):
        assert torch.allclose(CAGrad()(grads * scale).weights, reference, atol=1e-9)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(CAGrad)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(CAGrad)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(CAGrad(), lr=0.02)
    assert final < 0.5 * initial


def test_primal_dual_certificate_many_tasks(grad_checks):
    # K up to 40: the support-based root steps must land on the optimum, not just near it.
    for k, d, seed in ((40, 100, 0), (40, 30, 1), (20, 5_000, 2), (12, 8, 3)):
        grads = grad_checks.gradient_matrix(k, d, seed) + 0.3 * grad_checks.gradient_matrix(1, d, seed + 50)
        for c in (0.1, 0.5, 2.0):
            assert_certificate(grads, c)


def assert_certificate(grads, c):
    """d* lies on the sphere ||d − g0|| = c||g0|| and min_k g_k·d* equals the dual value F(w*)."""
    k, gram = len(grads), grads @ grads.T
    weights, _ = CAGrad(c=c).solve_dual(gram)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    radius = c * float(mean @ gram @ mean) ** 0.5
    update = CAGrad(c=c)(grads).update
    value = dual_objective(gram, weights, mean, radius)
    tol = 1e-7 * float(gram.diagonal().max())
    assert abs(float((update - grads.mean(0)).norm()) - radius) <= 1e-7 * radius
    assert float((grads @ update).min()) >= value - tol
    active = weights > 1e-9
    assert torch.allclose((grads @ update)[active], torch.full((int(active.sum()),), value, dtype=torch.float64), atol=tol)


def test_zero_in_the_hull_with_zero_mean_returns_the_mean_not_an_undefined_step():
    """Opposed rows: g_w* = 0 at w* = (1/2, 1/2), so d* = g_0 + c ||g_0|| g_w / ||g_w|| is 0/0;
    g_0 = 0 already has g_k · d >= 0, so it is the answer, with the mean weights."""
    v = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    for grads in (torch.stack([v, -v]), torch.stack([v, -v, 2 * v, -2 * v])):
        weights, _ = CAGrad(c=0.5).solve_dual(grads @ grads.T)
        assert float(torch.linalg.vector_norm(weights @ grads)) <= 1e-8 * float(v.norm())  # 0 is optimal
        result = CAGrad(c=0.5)(grads)
        k = len(grads)
        assert torch.equal(result.weights, torch.full((k,), 1.0 / k, dtype=torch.float64))
        assert torch.allclose(result.update, torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_zero_in_the_hull_returns_the_optimal_point_nearest_the_mean(grad_checks):
    """When g_w* = 0 is the dual optimum the optimal value is 0: d must have g_k · d >= 0 for
    every k, lie in the ball, and be the nearest such point to g_0 (KKT of that projection:
    d − g_0 = Gᵀλ, λ >= 0, λ_k (g_k · d) = 0). The mean g_0 itself fails on (1, 0), (−2, 0)."""
    cases = [(torch.tensor([[1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64), 2.0)]
    for seed in range(30):
        grads = grad_checks.gradient_matrix(3, 4, seed)
        pulled = -(0.3 + seed % 5) * (grads[0] + 0.5 * grads[1])  # 0 in the hull of the rows
        cases.append((torch.cat([grads, pulled[None]]), (1.0, 2.0, 5.0)[seed % 3]))
    degenerate = 0
    for grads, c in cases:
        k = len(grads)
        weights, _ = CAGrad(c=c).solve_dual(grads @ grads.T)
        if float(torch.linalg.vector_norm(weights @ grads)) > 1e-8 * float(grads.norm(dim=1).max()):
            continue
        degenerate += 1
        result = CAGrad(c=c)(grads)
        mean = grads.mean(0)
        scale = float(grads.norm(dim=1).max()) ** 2
        slack = result.weights - 1.0 / k  # λ
        products = grads @ result.update
        assert torch.allclose(result.update, result.weights @ grads)
        assert float(slack.min()) >= -1e-9 * max(1.0, float(slack.abs().max()))
        assert float(products.min()) >= -1e-9 * scale
        assert float((slack * products).abs().max()) <= 1e-9 * scale * max(1.0, float(slack.abs().max()))
        assert float((result.update - mean).norm()) <= c * float(mean.norm()) * (1 + 1e-9)
    assert degenerate >= 10, degenerate


def test_small_but_nonzero_dual_optimum_takes_the_step_not_the_fallback():
    """The fallback is for ||g_w*|| <= 1e-8 max_k ||g_k|| only. Rows v and −v + εu (u ⟂ v, unit,
    ε = 1e-5) put g_w* near (ε/2)u, ~5e-6 relative: above the threshold, so d* = g0 + r g_w*/||g_w*||
    must still be the certified optimum, off g0 by exactly r."""
    v = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    u = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    grads = torch.stack([v, -v + 1e-5 * u])
    weights, _ = CAGrad().solve_dual(grads @ grads.T)
    assert 1e-7 < float(torch.linalg.vector_norm(weights @ grads)) < 1e-4
    assert_certificate(grads, 0.5)


def test_default_radius_is_half_the_mean_norm(grad_checks):
    # One task: g0 = g, the ball's far point along g is (1 + c) g, so c = 0.5 gives 1.5 g.
    grads = grad_checks.gradient_matrix(1, 5, seed=5)
    assert torch.allclose(CAGrad()(grads).update, 1.5 * grads[0])


def test_negative_radius_is_refused():
    with pytest.raises(ValueError, match="c must be non-negative"):
        CAGrad(c=-0.1)


def test_the_dual_is_solved_by_exact_root_steps_not_bisection(grad_checks):
    """Each step solves φ(t) = 0 on the current support in closed form, so a few inner problems
    suffice where bisection would take about 50; the root may be t = 1 itself (one task)."""
    inner, calls = CAGrad._inner, []

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    with mock.patch.object(CAGrad, "_inner", staticmethod(counted)):
        for k, d, rank, scale, seed in grad_checks.random_cases(60, max_tasks=8, max_dim=12, seed=5):
            grads = grad_checks.gradient_matrix(k, d, seed, rank=rank)
            gram = grads @ grads.T
            for c in (0.2, 0.5, 2.0):
                calls.clear()
                weights, _ = CAGrad(c=c).solve_dual(gram)
                if float(weights @ gram @ weights) < 1e-12 * float(gram.diagonal().max()):
                    continue  # 0 in the hull: the documented bisection fallback
                assert len(calls) <= 5, (k, rank, c, len(calls))
