"""The exact K x K solvers in gradients.py shared by MGDA, UPGrad, CAGrad, Nash-MTL and FairGrad.

The batched active-set solver must give the answers of the Lawson–Hanson solver (which it
falls back to) on every input, reach them without the fallback on well-conditioned inputs
(that is where its speed comes from), and not depend on its starting guess.
"""

import warnings

import pytest
import torch

import reference_impls.weighting.gradients as gradients
from reference_impls.weighting.gradients import (
    min_norm_weights,
    nonnegative_quadratic_minima,
    nonnegative_quadratic_minimum,
    normalized_gramian,
    solve_power_system,
)


def assert_kkt(quadratic, linear, x, rel_tol=1e-11):
    """x >= 0, Qx − p >= 0 and x·(Qx − p) = 0 for every row, relative to the data's scale."""
    scale = max(float(quadratic.abs().max()), float(linear.abs().max()))
    gradient = x @ quadratic - linear
    assert (x >= 0).all()
    assert (gradient >= -rel_tol * scale).all(), float(gradient.min())
    size = float(x.abs().max().clamp_min(1))
    assert (x * gradient).abs().max() <= rel_tol * scale * size


def problems(grad_checks, count, max_tasks=40, max_dim=60, seed=0):
    """UPGrad-like (p = −M e_i) and random-p problems on normalised Gramians, mixed ranks."""
    for k, d, rank, _, case_seed in grad_checks.random_cases(count, max_tasks=max_tasks, max_dim=max_dim, seed=seed):
        grads = grad_checks.gradient_matrix(k, d, case_seed, rank=rank)
        quadratic, _ = normalized_gramian(grads @ grads.T)
        noise = torch.randn(k, k, generator=torch.Generator().manual_seed(case_seed), dtype=torch.float64)
        yield quadratic, torch.cat([-quadratic, noise @ quadratic])  # p in the range of Q: bounded


def test_batched_solver_matches_lawson_hanson(grad_checks):
    for quadratic, linear in problems(grad_checks, 40):
        x = nonnegative_quadratic_minima(quadratic, linear)
        reference = torch.stack([nonnegative_quadratic_minimum(quadratic, p) for p in linear])
        assert_kkt(quadratic, linear, x)
        # Minimisers of a convex QP share Qx (unique even when x is not, for singular Q).
        assert torch.allclose(x @ quadratic, reference @ quadratic, atol=1e-10, rtol=0)


def test_answer_does_not_depend_on_the_starting_guess(grad_checks):
    generator = torch.Generator().manual_seed(3)
    for quadratic, linear in problems(grad_checks, 20, seed=1):
        default = nonnegative_quadratic_minima(quadratic, linear)
        for _ in range(3):
            guess = torch.rand(linear.shape, generator=generator) < 0.5
            guessed = nonnegative_quadratic_minima(quadratic, linear, guess)
            assert_kkt(quadratic, linear, guessed)
            assert torch.allclose(guessed @ quadratic, default @ quadratic, atol=1e-10, rtol=0)


def test_well_conditioned_problems_need_no_fallback(grad_checks, monkeypatch):
    # The fast path alone must certify these; the fallback is for rank-deficient inputs.
    def no_fallback(*args):
        raise AssertionError("Lawson–Hanson fallback used on a well-conditioned problem")

    monkeypatch.setattr(gradients, "nonnegative_quadratic_minimum", no_fallback)
    for k, d in ((40, 200), (40, 10_000), (10, 30), (2, 5)):
        grads = grad_checks.gradient_matrix(k, d, seed=k + d) + 0.3 * grad_checks.gradient_matrix(1, d, seed=1)
        quadratic, _ = normalized_gramian(grads @ grads.T)
        linear = -quadratic
        assert_kkt(quadratic, linear, nonnegative_quadratic_minima(quadratic, linear))
        ones = torch.ones(1, k, dtype=torch.float64)
        assert_kkt(quadratic + 1, ones, nonnegative_quadratic_minima(quadratic + 1, ones))


def test_rank_deficient_problems_fall_back_and_stay_exact(grad_checks):
    grads = grad_checks.gradient_matrix(30, 6, seed=4)  # K > d: many singular Q_FF
    grads[1] = grads[0]  # and an exact duplicate
    quadratic, _ = normalized_gramian(grads @ grads.T)
    x = nonnegative_quadratic_minima(quadratic, -quadratic)
    assert_kkt(quadratic, -quadratic, x)


def test_min_norm_support_guess_changes_nothing(grad_checks):
    for k, d, rank, _, seed in grad_checks.random_cases(20, max_tasks=30, max_dim=40, seed=2):
        gram = grad_checks.gradient_matrix(k, d, seed, rank=rank)
        gram = gram @ gram.T
        weights = min_norm_weights(gram)
        for support in (torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool), weights == 0):
            other = min_norm_weights(gram, support=support)
            assert torch.allclose(gram @ other, gram @ weights, atol=1e-10 * float(gram.diagonal().max()))


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_power_system_exact_or_flagged(grad_checks, power):
    # exact=True only with a tight residual; exact=False exactly when 0 is in the hull
    # (then no solution exists), which we check with the min-norm point.
    for k, d, rank, scale, seed in grad_checks.random_cases(40, max_tasks=40, max_dim=50, seed=5):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        gram = grads @ grads.T
        solution = solve_power_system(gram, power)
        matrix, _ = normalized_gramian(gram)
        hull = min_norm_weights(matrix)
        zero_in_hull = float(hull @ matrix @ hull) <= 1e-14
        if solution.exact:
            w = solution.weights
            assert (w > 0).all()
            assert torch.allclose(w**power * (gram @ w), torch.ones(k, dtype=torch.float64), atol=1e-9, rtol=0)
        else:
            assert zero_in_hull, (k, d, rank, scale)
            assert torch.equal(solution.weights, torch.zeros(k, dtype=torch.float64))


def test_two_tasks_start_at_the_nash_solution():
    # For K = 2 and p = 1 the scaled start c·(1/√M_kk) solves the system: Newton does no step.
    grads = torch.tensor([[1.0, 0.2, 0.0], [-0.3, 2.0, 1.0]], dtype=torch.float64)
    matrix, _ = normalized_gramian(grads @ grads.T)
    u = matrix.diagonal().rsqrt()
    start = u * (2 / (u @ matrix @ u)).sqrt()
    assert torch.allclose(start * (matrix @ start), torch.ones(2, dtype=torch.float64), atol=1e-15, rtol=0)


def test_two_task_min_norm_closed_form_matches_the_active_set_solver(grad_checks):
    for seed in range(40):
        grads = grad_checks.gradient_matrix(2, 1 + seed % 5, seed, scale=10.0 ** (seed % 7 - 3))
        if seed % 4 == 0:
            grads[1] = -0.5 * grads[0]  # antiparallel: the hull contains 0
        matrix, _ = normalized_gramian(grads @ grads.T)
        beta = nonnegative_quadratic_minimum(matrix + 1, torch.ones(2, dtype=torch.float64))
        weights = min_norm_weights(grads @ grads.T)
        reference = beta / beta.sum()
        # Same minimum value (the point of the hull); weights agree unless the rows coincide.
        assert abs(float(weights @ matrix @ weights - reference @ matrix @ reference)) <= 1e-14
        assert torch.allclose(weights, reference, atol=1e-9)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_nearly_opposite_gradients_are_solved(grad_checks, power):
    # g and −g + εh: a solution exists (0 is just outside the hull) but needs large weights,
    # and (Mw)_i becomes a small difference of large terms. The solver must still return it,
    # to float64's rounding floor of the residual, computed here independently.
    eps = torch.finfo(torch.float64).eps
    for seed in range(4):
        g, h = grad_checks.gradient_matrix(2, 8, seed=seed)
        for gap in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
            for grads in (torch.stack([g, -g + gap * h]), torch.stack([g, -g + gap * h, h])):
                gram = grads @ grads.T
                solution = solve_power_system(gram, power)
                w = solution.weights
                assert solution.exact and (w > 0).all(), (seed, gap, len(grads))
                floor = 4 * len(w) * eps * float((w**power * (gram.abs() @ w)).max())
                residual = float((w**power * (gram @ w) - 1).abs().max())
                assert residual <= max(1e-12, floor) and abs(residual - solution.residual) <= floor


def test_nearly_opposite_pair_matches_the_two_task_closed_form(grad_checks):
    # K = 2, p = 1: α_i = 1 / (||g_i|| √(1 + cos)). 1 + cos comes from the vectors, exactly
    # enough; the solver sees only the Gramian, whose rounding leaves a relative error of
    # about eps / (1 + cos) in α. The bound is checked with a factor 2.
    eps = torch.finfo(torch.float64).eps
    g, h = grad_checks.gradient_matrix(2, 8, seed=0)
    for gap in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        grads = torch.stack([g, -g + gap * h])
        norms = grads.norm(dim=1)
        one_plus_cos = float((grads[0] / norms[0] + grads[1] / norms[1]).norm() ** 2 / 2)
        expected = 1 / (norms * one_plus_cos**0.5)
        alpha = solve_power_system(grads @ grads.T, 1.0).weights
        assert float(((alpha - expected) / expected).abs().max()) <= 2 * eps / one_plus_cos


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_opposite_rows_are_never_called_solved(grad_checks, power):
    # Exactly opposite rows have no solution, and rows whose 1 + cos is near float64's eps
    # cannot be told from them. Found by comparison with TorchJD: the rounding floor grows
    # with w, so on [[1, 2], [-0.3, -0.6]] Newton used to stop at w ~ 1e8 with residual 1.3
    # and exact=True. Whatever is called exact must now be certified: residual + floor < 1/2.
    cases = [torch.tensor([[1.0, 2.0], [-0.3, -0.6]], dtype=torch.float64)]
    for seed in range(6):
        g, h = grad_checks.gradient_matrix(2, 8, seed=seed)
        for ratio in (0.3, 1.0, 7.0):
            cases.append(torch.stack([g, -ratio * g]))
        cases.append(torch.stack([g, -g + 1e-8 * h]))
    eps = torch.finfo(torch.float64).eps
    for grads in cases:
        opposite = torch.linalg.matrix_rank(grads) == 1
        gram = grads @ grads.T
        solution = solve_power_system(gram, power)
        if opposite:
            assert not solution.exact and torch.equal(solution.weights, torch.zeros(2, dtype=torch.float64))
        elif solution.exact:
            matrix, scale = normalized_gramian(gram)
            w = solution.weights * scale ** (1.0 / (1.0 + power))  # the solver's normalised weights
            floor = 4 * 2 * eps * float((w**power * (matrix.abs() @ w)).max())
            residual = float((w**power * (matrix @ w) - 1).abs().max())
            assert residual + floor < 0.5, (grads, residual, floor)


def brute_force_minimum(quadratic, linear):
    """min_{x >= 0} ½ xᵀQx − pᵀx by trying every support S: x_S solves Q_SS x_S = p_S (the
    stationarity condition on S) and the best feasible one is the minimum. 2^K solves, K <= 6."""
    k = len(linear)
    best, best_value = torch.zeros_like(linear), 0.0
    for mask in range(1, 2**k):
        support = torch.tensor([(mask >> i) & 1 == 1 for i in range(k)])
        x = torch.zeros_like(linear)
        x[support] = torch.linalg.lstsq(quadratic[support][:, support], linear[support, None]).solution[:, 0]
        value = float(0.5 * x @ quadratic @ x - linear @ x)
        if (x >= 0).all() and value < best_value:
            best, best_value = x, value
    return best, best_value


def nnls_problems(count, seed):
    """Q = AᵀA, p = Aᵀb (bounded below) with A of full column rank or not. Every other problem
    has a decoy: column 0 is close to a_1 + a_2 and b is a_1 + a_2, so column 0 enters first
    and must leave again when a_1 and a_2 are in (the solver's step back to the boundary)."""
    generator = torch.Generator().manual_seed(seed)
    for case in range(count):
        k = 3 + case % 4
        rows = k + 3 if case % 4 < 2 else k - 1  # full column rank, then rank-deficient
        a = torch.randn(rows, k, generator=generator, dtype=torch.float64)
        b = torch.randn(rows, generator=generator, dtype=torch.float64)
        if case % 2:
            noise = torch.randn(2, rows, generator=generator, dtype=torch.float64)
            a[:, 0] = 0.6 * (a[:, 1] + a[:, 2]) + 0.1 * noise[0]
            b = a[:, 1] + a[:, 2] + 0.1 * noise[1]
        yield a.T @ a, a.T @ b


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_lawson_hanson_reaches_the_brute_force_minimum_at_any_scale(scale):
    # x* is the same for (cQ, cp) as for (Q, p): the objective is only multiplied by c.
    for quadratic, linear in nnls_problems(30, seed=7):
        _, best_value = brute_force_minimum(quadratic, linear)
        x = nonnegative_quadratic_minimum(scale * quadratic, scale * linear)
        assert_kkt(scale * quadratic, scale * linear, x, rel_tol=1e-9)
        value = float(0.5 * x @ quadratic @ x - linear @ x)
        assert abs(value - best_value) <= 1e-9 * max(1.0, abs(best_value))


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_batched_solver_reaches_the_brute_force_minimum_at_any_scale(scale):
    for quadratic, linear in nnls_problems(30, seed=8):
        linears = torch.stack([linear, -linear, quadratic[0], linear - quadratic[-1]])
        x = nonnegative_quadratic_minima(scale * quadratic, scale * linears)
        assert_kkt(scale * quadratic, scale * linears, x, rel_tol=1e-9)
        for row, p in zip(x, linears):
            _, best_value = brute_force_minimum(quadratic, p)
            value = float(0.5 * row @ quadratic @ row - p @ row)
            assert abs(value - best_value) <= 1e-9 * max(1.0, abs(best_value))


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_power_system_on_orthogonal_rows_has_the_closed_form(power):
    # M = diag(n_k²), so n_k² w_k = w_k^(−p) gives w_k = n_k^(−2/(1+p)). Norms 1, 1/2, 1/4 make
    # the largest diagonal entry exactly 1; the float32 input is solved in float64.
    norms = torch.tensor([1.0, 0.5, 0.25])
    grads = torch.diag(norms)
    solution = solve_power_system(grads @ grads.T, power)
    assert solution.exact and solution.residual <= 1e-12 and solution.weights.dtype == torch.float64
    torch.testing.assert_close(solution.weights, norms.double() ** (-2 / (1 + power)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_power_system_without_solution_says_so_quietly(power):
    # A zero row or two opposite rows put 0 in the hull: the documented answer is weights 0 (in
    # float64), exact=False and residual inf, and the expected inf/nan of the start must not
    # surface as numpy warnings.
    g, h = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    for grads in (torch.stack([g, torch.zeros(3), h]), torch.stack([g, -2 * g])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            solution = solve_power_system(grads @ grads.T, power)
        assert solution.exact is False and solution.residual == float("inf")
        assert solution.weights.dtype == torch.float64 and torch.equal(solution.weights, torch.zeros(len(grads)))


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_nearly_opposite_pair_among_more_tasks_is_solved_or_honestly_refused(grad_checks, power):
    # g and −g + εh among K = 6 rows in 30 dimensions: a solution exists, with weights ~1/ε on
    # the pair. Where it is called exact, the residual must be certified as the docstring says:
    # below max(tol, floor) and residual + floor < 1/2, floor = 4K·eps·max_i w_i^p (|M| w)_i.
    # The floor grows with K: a K-independent one would accept residuals of 1e-2 here.
    eps = torch.finfo(torch.float64).eps
    for seed in range(2):
        rows = grad_checks.gradient_matrix(6, 30, seed=seed)
        for gap in (1e-3, 1e-4, 1e-5, 1e-6):
            grads = rows.clone()
            grads[1] = -rows[0] + gap * rows[1]
            gram = grads @ grads.T
            solution = solve_power_system(gram, power)
            assert solution.exact or gap < 1e-3, (seed, gap)
            if solution.exact:
                matrix, scale = normalized_gramian(gram)
                w = solution.weights * scale ** (1.0 / (1.0 + power))  # the solver's normalised weights
                floor = 4 * 6 * eps * float((w**power * (matrix.abs() @ w)).max())
                residual = float((w**power * (matrix @ w) - 1).abs().max())
                assert residual <= max(1e-12, floor) and residual + floor < 0.5, (seed, gap, residual, floor)


def test_batched_solver_answers_have_linearly_independent_supports():
    # Documented certificate: no Cholesky pivot below 1e-9 of the scale, so on rank-deficient Q
    # the support S of every answer has Q_SS well away from singular, as Lawson–Hanson's has.
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        k = int(torch.randint(3, 20, (1,), generator=generator))
        rank = int(torch.randint(1, k, (1,), generator=generator))
        left = torch.randn(k, rank, generator=generator, dtype=torch.float64)
        grads = left @ torch.randn(rank, 40, generator=generator, dtype=torch.float64)
        quadratic, _ = normalized_gramian(grads @ grads.T)
        noise = torch.randn(k, k, generator=generator, dtype=torch.float64)
        linear = torch.cat([-quadratic, noise @ quadratic])
        for x in nonnegative_quadratic_minima(quadratic, linear):
            support = x > 0
            if support.any():
                assert float(torch.linalg.eigvalsh(quadratic[support][:, support]).min()) > 1e-10


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_power_system_with_norms_over_four_decades_is_solved(power):
    # Independent rows (K <= d, so 0 is outside their hull): a solution exists and must be found,
    # even when Newton needs its line search because the row norms span 1e-4 to 1.
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        k = int(torch.randint(2, 16, (1,), generator=generator))
        rows = torch.randn(k, k + 5, generator=generator, dtype=torch.float64)
        grads = rows * torch.logspace(-4, 0, k, dtype=torch.float64)[:, None]
        gram = grads @ grads.T
        solution = solve_power_system(gram, power)
        w = solution.weights
        assert solution.exact and (w > 0).all()
        torch.testing.assert_close(w**power * (gram @ w), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-9)
