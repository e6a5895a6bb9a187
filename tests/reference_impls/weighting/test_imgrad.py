import pytest
import torch

from reference_impls.weighting.imgrad import IMGrad


def objective(gram, w, rho, c):
    """The IMGrad dual F(w) = (1.5 − ρ) g_w·g_0 + ρ c ||g_0|| ||g_w|| (w: ... x K)."""
    k = gram.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=gram.dtype)
    norm_0 = float(mean @ gram @ mean) ** 0.5
    return (1.5 - rho) * (w @ gram @ mean) + rho * c * norm_0 * ((w @ gram) * w).sum(-1).clamp_min(0).sqrt()


def test_two_tasks_match_a_grid_search_of_the_official_rule():
    # Everything recomputed independently: g_m by the two-task MGDA closed form, w* by a grid.
    grads = torch.tensor([[2.0, 0.3, -0.5], [-0.4, 1.0, 0.2]], dtype=torch.float64)
    c = 0.8
    g1, g2 = grads
    x = float(((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1))
    g_m, g_0 = x * g1 + (1 - x) * g2, grads.mean(0)
    rho = float(g_0 @ g_m / (g_0.norm() * g_m.norm()))
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    candidates = torch.stack([grid, 1 - grid], dim=1)
    best = candidates[objective(grads @ grads.T, candidates, rho, c).argmin()]
    g_w = best @ grads
    expected = g_0 + c * g_0.norm() / g_w.norm() * g_w
    method = IMGrad(c=c)
    update = method(grads).update
    assert abs(method.last_imbalance - rho) < 1e-12
    assert torch.allclose(update, expected, atol=1e-5 * float(expected.norm()))


def test_dual_solution_beats_random_simplex_points(grad_checks):
    for seed in range(4):
        grads = grad_checks.gradient_matrix(4, 6, seed=seed)
        gram = grads @ grads.T
        method = IMGrad(c=0.5)
        weights = method(grads).weights
        mean = torch.full((4,), 0.25, dtype=torch.float64)
        direction = weights - mean  # = (c||g_0||/||g_w*||) w*: recover w* on the simplex
        if float(direction.sum()) <= 0:
            continue
        w_star = direction / direction.sum()
        samples = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((5000,))
        best = objective(gram, w_star, method.last_imbalance, 0.5)
        assert float(best) <= float(objective(gram, samples, method.last_imbalance, 0.5).min()) + 1e-10


def test_imbalance_of_two_orthogonal_gradients_has_a_closed_form():
    # g_1 = (a, 0), g_2 = (0, 1): g_0 ∝ (a, 1) and g_m ∝ (1/a, 1), so ρ = 2a / (1 + a²).
    # One object for all: last_imbalance is the latest call's ρ.
    method = IMGrad()
    for a in (1.0, 2.0, 10.0, 100.0):
        method(torch.tensor([[a, 0.0], [0.0, 1.0]], dtype=torch.float64))
        assert abs(method.last_imbalance - 2 * a / (1 + a * a)) < 1e-12


def test_imbalance_lies_in_unit_interval(grad_checks):
    for k, d, rank, scale, seed in grad_checks.random_cases(30, max_tasks=6, max_dim=10, seed=5):
        method = IMGrad()
        method(grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale))
        assert 0.0 <= method.last_imbalance <= 1.0


def test_c_zero_is_the_mean(grad_checks):
    grads = grad_checks.gradient_matrix(5, 9, seed=0)
    assert torch.allclose(IMGrad(c=0.0)(grads).update, grads.mean(0))


def test_no_common_descent_direction_steps_towards_the_least_aligned_task(grad_checks):
    # 0 in the hull: g_m = 0, so ρ = 0 up to the solver's rounding (exactly 0 on one CPU, 1.9e-8 on
    # another). The dual then only minimises g_w · g_0: g_w* is the task least aligned with g_0,
    # and the step keeps length c.
    g, h = grad_checks.gradient_matrix(2, 6, seed=3)
    grads = torch.stack([g, -3 * g, h])
    method = IMGrad(c=0.4)
    update = method(grads).update
    g_0 = grads.mean(0)
    worst = grads[(grads @ g_0).argmin()]
    assert method.last_imbalance < 1e-6
    assert torch.allclose(update, g_0 + 0.4 * g_0.norm() * worst / worst.norm(), atol=1e-6)


def test_vanishing_step_direction_returns_the_mean():
    # g, −g, h with h ⊥ g: g_m = 0, so ρ = 0; g and −g both pull 0 on g_0 = h/3, and their
    # face's min-norm point is g_w* = 0, where the step's direction is undefined: d = g_0.
    grads = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    result = IMGrad(c=0.5)(grads)
    assert torch.allclose(result.weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(result.update, grads.mean(0), atol=1e-12)


def test_negative_radius_is_refused():
    IMGrad(c=0.0)
    with pytest.raises(ValueError, match="c"):
        IMGrad(c=-0.1)


def test_imbalance_zero_is_the_limit_of_small_imbalance(grad_checks, monkeypatch):
    # ρ = 0 must not switch rules: at ρ = 1e-9 the dual already points at the least aligned task.
    for seed in range(5):
        grads = grad_checks.gradient_matrix(3, 5, seed=seed)
        steps = []
        for rho in (0.0, 1e-9):
            monkeypatch.setattr(IMGrad, "imbalance", staticmethod(lambda matrix, cutoff=0.0, rho=rho: rho))
            steps.append(IMGrad(c=0.5)(grads).update)
        assert torch.allclose(steps[0], steps[1], atol=1e-6 * float(steps[1].norm()))


def test_balanced_orthogonal_gradients_give_the_scaled_mean():
    grads = 3.0 * torch.eye(4, dtype=torch.float64)
    method = IMGrad(c=0.5)
    update = method(grads).update
    assert abs(method.last_imbalance - 1.0) < 1e-12 and torch.allclose(update, 1.5 * grads.mean(0))


def test_scale_invariant_weights(grad_checks):
    grads = grad_checks.gradient_matrix(4, 6, seed=4)
    reference = IMGrad()(grads).weights
    for scale in (1e-10, 1e10):
        assert torch.allclose(IMGrad()(grads * scale).weights, reference, atol=1e-9)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(IMGrad)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(IMGrad)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(IMGrad(), steps=30, lr=0.02)
    assert final < 0.5 * initial


def test_no_common_descent_direction_with_a_tied_face_steps_to_its_min_norm_point():
    # g_1 = (-1, 1), g_2 = (-1, -2), g_3 = (4, 1): the origin is inside the triangle, so g_m = 0
    # and ρ = 0; g_0 = (2/3, 0) pulls g_1 and g_2 equally (-2/3), so the least aligned face is
    # the segment g_1 g_2, whose min-norm point is (-1, 0) (weights 2/3, 1/3, not 1/2, 1/2).
    # Step: g_0 + c ||g_0|| (-1, 0) = (2/3)(1 - c) e_1. The solver's g_m is 0 only up to
    # rounding (||g_m||² ~ 1e-16 in float64, so ||g_m|| ~ 1e-8): ρ must still read exactly 0,
    # not the cosine of g_0 with rounding noise (~5e-9, where CAGrad's dual loses the tie-break).
    grads = torch.tensor([[-1.0, 1.0], [-1.0, -2.0], [4.0, 1.0]], dtype=torch.float64)
    for scale in (1e-6, 1.0, 1e6):
        method = IMGrad(c=0.4)
        update = method(scale * grads).update
        assert method.last_imbalance == 0.0
        assert torch.allclose(update, scale * torch.tensor([0.4, 0.0], dtype=torch.float64), atol=1e-9 * scale)


def test_defaults_are_the_official_code_values():
    # c = 0.5, the default of the official imgrad(grads, alpha=0.5, ...). For G = I (2 tasks):
    # g_0 = (0.5, 0.5) = g_MGDA, so ρ = 1 and c' = ρc/(1.5 − ρ) = 1; by symmetry w* = (0.5, 0.5), g_w* = g_0,
    # and d = g_0 + (c·||g_0||/||g_w*||)·g_w* = (1 + c)·g_0 = 1.5·(0.5, 0.5) = (0.75, 0.75).
    method = IMGrad()
    out = method(torch.eye(2, dtype=torch.float64))
    assert abs(method.last_imbalance - 1.0) < 1e-12
    torch.testing.assert_close(out.update, torch.tensor([0.75, 0.75], dtype=torch.float64))


def test_step_from_the_mean_has_length_c_times_its_norm_even_when_g_w_is_small():
    # d = g_0 + c ||g_0|| g_w / ||g_w||: whenever g_w != 0 the step has length c ||g_0||, also
    # for nearly opposite rows, where the normalised ||g_w|| is only ~1e-4..1e-5.
    generator = torch.Generator().manual_seed(0)
    a, v, h = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    for delta in (1e-3, 1e-4):
        for grads in (torch.stack([a, -a + delta * v]), torch.stack([a, -a + delta * v, h])):
            c = 0.5
            mean = grads.mean(0)
            update = IMGrad(c=c)(grads).update
            assert abs(float((update - mean).norm()) / (c * float(mean.norm())) - 1) < 1e-6


def test_imbalance_called_on_its_own_has_the_orthogonal_closed_form():
    # The static ``imbalance`` with its default cutoff: g_1 = (a, 0), g_2 = (0, 1) give
    # ρ = 2a / (1 + a²); only vanishing vectors (not these) read as 0.
    for a in (1.0, 3.0):
        gram = torch.diag(torch.tensor([a * a, 1.0], dtype=torch.float64))
        assert abs(IMGrad.imbalance(gram / gram.max()) - 2 * a / (1 + a * a)) < 1e-12


def test_float32_gradients_with_zero_in_the_hull_have_no_imbalance(grad_checks):
    # g_3 = −(0.3 g_1 + 0.7 g_2): g_m = 0, which must read ρ = 0 as in float64. In float32 the
    # Gramian's rounding leaves ||g_m||² ~ 1e-8 relative, which the float32 cutoff must still
    # call vanishing, not take the cosine of that noise.
    for seed in (0, 3, 5):
        g_1, g_2 = grad_checks.gradient_matrix(2, 5, seed=seed)
        grads = torch.stack([g_1, g_2, -(0.3 * g_1 + 0.7 * g_2)]).to(torch.float32)
        method = IMGrad(c=0.4)
        method(grads)
        assert method.last_imbalance == 0.0, seed


def test_all_zero_gradients_have_no_imbalance():
    method = IMGrad()
    method(torch.zeros(3, 4, dtype=torch.float64))
    assert method.last_imbalance == 0.0
