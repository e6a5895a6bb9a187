"""The exact K x K solvers in gradients.py shared by MGDA, UPGrad, CAGrad, Nash-MTL and FairGrad.

The batched active-set solver must give the answers of the Lawson–Hanson solver (which it
falls back to) on every input, reach them without the fallback on well-conditioned inputs
(that is where its speed comes from), and not depend on its starting guess.
"""

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
