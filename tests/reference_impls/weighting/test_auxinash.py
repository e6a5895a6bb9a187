import pytest
import torch

from reference_impls.weighting.auxinash import AuxiNash, solve_asymmetric_nash
from reference_impls.weighting.nash_mtl import NashMTL


def random_powers(k, seed):
    p = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
    return p / p.sum() * k


def test_stationarity_of_the_asymmetric_bargaining_problem(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(40, max_tasks=8, max_dim=30, seed=2):
        if k > d:
            continue
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        p = random_powers(k, seed)
        method = AuxiNash(preferences=p)
        update = method(grads).update
        utilities = grads @ update
        assert method.last_solution.exact and (utilities > 0).all()
        # ∇_d Σ p_k log(g_k·d) = Σ p_k g_k / (g_k·d) must equal d itself (normal to the ball
        # ||d||² = Σp, multiplier 1), computed from the rows, not from the solver's Gramian.
        gradient = (p / utilities) @ grads
        assert torch.allclose(gradient, update, rtol=1e-8, atol=1e-8 * float(update.norm()))
        assert abs(float(update.norm() ** 2) - k) < 1e-8 * k


def test_solution_beats_other_directions_on_the_ball(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=4)
    p = torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    update = AuxiNash(preferences=p)(grads).update
    best = float(p @ torch.log(grads @ update))
    others = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    others = others / others.norm(dim=1, keepdim=True) * update.norm()
    utilities = others @ grads.T
    feasible = (utilities > 0).all(1)
    assert int(feasible.sum()) > 10
    assert float((torch.log(utilities[feasible]) @ p).max()) <= best


def test_equal_preferences_reduce_to_nash_mtl(grad_checks):
    grads = grad_checks.gradient_matrix(4, 9, seed=5)
    for p in (None, [3.0, 3.0, 3.0, 3.0]):
        assert torch.allclose(AuxiNash(preferences=p)(grads).weights, NashMTL()(grads).weights, rtol=1e-10)


def test_orthogonal_gradients_closed_form():
    norms = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    p = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)  # already sums to K = 3
    alpha = AuxiNash(preferences=p)(torch.diag(norms)).weights
    assert torch.allclose(alpha, p.sqrt() / norms, rtol=1e-12)  # n_k² α_k² = p_k


def test_more_power_gives_the_main_task_more_improvement(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=6)
    gains = []
    for main in (0.2, 1.0, 5.0, 25.0):
        update = AuxiNash(preferences=[main, 1.0, 1.0])(grads).update
        gains.append(float(grads[0] @ update))
    assert all(a < b for a, b in zip(gains, gains[1:]))


def test_preferences_are_clamped_and_normalised():
    method = AuxiNash(preferences=[2.0, 0.0, 6.0], min_preference=1e-4)
    assert abs(float(method.preferences.sum()) - 3) < 1e-12 and float(method.preferences.min()) > 0


def test_alpha_jacobian_matches_finite_differences(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=7)
    p = torch.tensor([1.6, 0.9, 0.5], dtype=torch.float64)
    method = AuxiNash(preferences=p)
    method(grads)
    jacobian = method.alpha_jacobian()
    h = 1e-6
    for j in range(3):
        shifted = AuxiNash(preferences=p)
        shifted.preferences = p + h * torch.eye(3, dtype=torch.float64)[j]  # unnormalised on purpose
        plus = shifted(grads).weights
        shifted.preferences = p - h * torch.eye(3, dtype=torch.float64)[j]
        minus = shifted(grads).weights
        assert torch.allclose((plus - minus) / (2 * h), jacobian[:, j], rtol=1e-6, atol=1e-8)


def test_preference_step_moves_power_towards_a_helpful_task(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=8)
    method = AuxiNash()
    method(grads)
    # A validation loss that falls as α_1 grows: its power must grow, p stays normalised.
    grad_p = method.preference_step(torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), lr=0.1)
    assert grad_p[1] < 0 and method.preferences[1] > method.preferences[0]
    assert abs(float(method.preferences.sum()) - 3) < 1e-12


def test_preference_step_is_the_chain_rule_through_alpha(grad_checks):
    # L_val(α) = cᵀα, so dL_val/dp_j = Σ_i c_i dα_i/dp_j, here by central differences of the
    # solver's α. The Jacobian is not symmetric: contracting it on the wrong side fails.
    grads = grad_checks.gradient_matrix(3, 6, seed=9)
    p = torch.tensor([1.4, 1.1, 0.5], dtype=torch.float64)
    c = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    method = AuxiNash(preferences=p)
    method(grads)
    grad_p = method.preference_step(c, lr=0.05)
    h = 1e-6
    expected = torch.zeros(3, dtype=torch.float64)
    for j in range(3):
        shifted = AuxiNash()
        shifted.preferences = p + h * torch.eye(3, dtype=torch.float64)[j]
        plus = c @ shifted(grads).weights
        shifted.preferences = p - h * torch.eye(3, dtype=torch.float64)[j]
        expected[j] = (plus - c @ shifted(grads).weights) / (2 * h)
    assert torch.allclose(grad_p, expected, rtol=1e-6, atol=1e-9)
    stepped = (p - 0.05 * expected).clamp_min(1e-4)
    assert torch.allclose(method.preferences, stepped / stepped.sum() * 3, rtol=1e-6)


def test_single_task_is_the_unit_gradient(grad_checks):
    grads = grad_checks.gradient_matrix(1, 5, seed=2)
    assert torch.allclose(AuxiNash()(grads).update, grads[0] / grads[0].norm())


def test_wrong_number_of_preferences_is_rejected(grad_checks):
    try:
        AuxiNash(preferences=[1.0, 2.0])(grad_checks.gradient_matrix(3, 5, seed=0))
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


def test_no_solution_is_flagged_and_finite():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    method = AuxiNash(preferences=[3.0, 1.0, 1.0])
    result = method(torch.stack([g, -g, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)]))
    assert not method.last_solution.exact and torch.equal(result.update, torch.zeros(3, dtype=torch.float64))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(AuxiNash)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(AuxiNash)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(AuxiNash(preferences=[2.0, 1.0]), steps=30, lr=0.05)
    assert final < 0.5 * initial


def test_default_min_preference_is_1e_4():
    # [1, 0] -> clamped to [1, 1e-4] -> rescaled to sum K = 2
    expected = torch.tensor([1.0, 1e-4], dtype=torch.float64) * 2 / (1 + 1e-4)
    assert torch.allclose(AuxiNash(preferences=[1.0, 0.0]).preferences, expected, rtol=1e-12)



def test_alpha_jacobian_needs_an_exact_solution():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    method = AuxiNash()
    with pytest.raises(RuntimeError):
        method.alpha_jacobian()  # never called
    method(torch.stack([g, -g]))  # 0 in the hull: no solution
    with pytest.raises(RuntimeError):
        method.alpha_jacobian()


def test_more_preferences_than_tasks_are_rejected(grad_checks):
    with pytest.raises(ValueError, match="4 preferences for 3 tasks"):
        AuxiNash(preferences=[1.0, 2.0, 3.0, 4.0])(grad_checks.gradient_matrix(3, 5, seed=0))


def _independent_residual(grads, alpha, p):
    # max_k |α_k (Mα)_k / p_k − 1| and float64's rounding floor of it, from the rows themselves.
    eps = torch.finfo(torch.float64).eps
    gram = grads @ grads.T
    residual = float((alpha * (gram @ alpha) / p - 1).abs().max())
    floor = 4 * len(alpha) * eps * float((alpha * (gram.abs() @ alpha) / p).max())
    return residual, floor


def test_nearly_opposite_gradients_are_solved_for_unequal_powers(grad_checks):
    # g and −g + εh: 0 is just outside the hull, so a solution exists, but α is large and
    # (Mα)_k is a small difference of large terms. It must still be found and certified to
    # float64's rounding floor, whatever the powers, a dominant main task included (floor computed here).
    for seed in range(3):
        g, h = grad_checks.gradient_matrix(2, 8, seed=seed)
        for gap in (1e-2, 1e-4, 1e-6):
            for grads in (torch.stack([g, -g + gap * h]), torch.stack([g, -g + gap * h, h])):
                k = len(grads)
                dominant = torch.tensor([3.0] + [0.01] * (k - 1), dtype=torch.float64)  # a main task
                # At gap 1e-6 a 300:1 power ratio lifts float64's floor past what certifies a solution.
                powers = [random_powers(k, seed)] + ([dominant / dominant.sum() * k] if gap >= 1e-4 else [])
                for p in powers:
                    method = AuxiNash(preferences=p)
                    alpha = method(grads).weights
                    assert method.last_solution.exact and (alpha > 0).all(), (seed, gap, p)
                    residual, floor = _independent_residual(grads, alpha, p)
                    assert residual <= max(1e-12, floor), (seed, gap, residual, floor)
                    assert abs(residual - method.last_solution.residual) <= floor + 1e-12


def test_largest_gradient_of_unit_norm_is_solved():
    # The solver normalises by the largest squared norm; a scale of exactly 1 is an ordinary case.
    norms = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    p = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    method = AuxiNash(preferences=p)
    alpha = method(torch.diag(norms)).weights
    assert method.last_solution.exact
    assert torch.allclose(alpha, p.sqrt() / norms, rtol=1e-12)  # n_k² α_k² = p_k


def test_reported_residual_is_the_true_one_and_tol_is_the_stopping_rule(grad_checks):
    # A loose ``tol`` lets Newton stop early: the residual it reports is still the real one,
    # and lies between the tight default and the loose bound.
    grads = grad_checks.gradient_matrix(4, 9, seed=12)
    p = random_powers(4, seed=12)
    for tol in (1e-12, 0.3):
        method = AuxiNash(preferences=p, tol=tol)
        alpha = method(grads).weights
        residual, floor = _independent_residual(grads, alpha, p)
        assert method.last_solution.exact and residual <= tol
        assert abs(residual - method.last_solution.residual) <= floor + 1e-12
    assert residual > 1e-6  # the loose run really stopped before the tight tolerance


def test_no_solution_reports_infinite_residual_and_exact_false():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    method = AuxiNash()
    method(torch.stack([g, -g]))
    assert method.last_solution.exact is False and method.last_solution.residual == float("inf")


def test_preference_step_accepts_a_float32_validation_gradient(grad_checks):
    # A float32 model hands a float32 dL_val/dα; the step is taken in float64 all the same.
    grads = grad_checks.gradient_matrix(3, 6, seed=9)
    c = torch.tensor([0.75, -1.25, 0.5], dtype=torch.float64)  # exact in float32
    steps = []
    for dtype in (torch.float64, torch.float32):
        method = AuxiNash(preferences=[1.4, 1.1, 0.5])
        method(grads)
        steps.append(method.preference_step(c.to(dtype), lr=0.05))
        assert steps[-1].dtype == torch.float64
    assert torch.equal(steps[0], steps[1])


def test_the_solver_function_defaults_to_a_tight_tolerance(grad_checks):
    # ``solve_asymmetric_nash`` called on its own must solve to its documented 1e-12.
    grads = grad_checks.gradient_matrix(4, 9, seed=13)
    p = random_powers(4, seed=13)
    solution = solve_asymmetric_nash(grads @ grads.T, p)
    residual, floor = _independent_residual(grads, solution.weights, p)
    assert solution.exact and residual <= max(1e-12, floor)
