import pytest
import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import GradientMethod
from reference_impls.weighting.continuous_pareto import (
    ContinuousParetoExploration,
    minres,
    weighted_hessian_vector_product,
)
from reference_impls.weighting.gradients import per_task_gradients
from reference_impls.weighting.mgda import MGDA

# Two quadratics ½(x − c_i)ᵀ A_i (x − c_i) with different curvatures. Their Pareto set is the
# curve x(t) = (tA + (1−t)B)⁻¹ (tA c₁ + (1−t)B c₂), t ∈ [0, 1], where α = (t, 1 − t).
A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0, 0.3], [0.0, 3.0, 0.0], [0.3, 0.0, 0.5]], dtype=torch.float64)
C1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
C2 = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)


def losses(x):
    return torch.stack([0.5 * (x - C1) @ A @ (x - C1), 0.5 * (x - C2) @ B @ (x - C2)])


def pareto_point(t):
    return torch.linalg.solve(t * A + (1 - t) * B, t * A @ C1 + (1 - t) * B @ C2)


def pareto_velocity(t):
    """dx/dt from differentiating (tA + (1−t)B) x = tA c₁ + (1−t)B c₂."""
    x = pareto_point(t)
    return torch.linalg.solve(t * A + (1 - t) * B, A @ (C1 - x) - B @ (C2 - x))


def explore(x, beta, damping=0.0):
    x = x.clone().requires_grad_()
    values = losses(x)
    grads = per_task_gradients(values, [x])
    hvp = weighted_hessian_vector_product(values, [x])
    method = ContinuousParetoExploration(beta, damping=damping)
    return method(grads, hvp).update, method


def stationarity(x):
    """||Σ α_i ∇L_i|| at MGDA's α: zero exactly on the Pareto set of this convex problem."""
    x = x.clone().requires_grad_()
    return float(MGDA()(per_task_gradients(losses(x), [x])).update.norm())


def test_minres_matches_a_direct_solve_on_an_indefinite_system():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, -0.5, -1.0, -2.0, -4.0], dtype=torch.float64)) @ q.T
    rhs = torch.randn(8, generator=generator, dtype=torch.float64)
    assert torch.allclose(minres(lambda v: matrix @ v, rhs), torch.linalg.solve(matrix, rhs), atol=1e-9)
    start = torch.randn(8, generator=generator, dtype=torch.float64)
    assert torch.allclose(minres(lambda v: matrix @ v, rhs, start), torch.linalg.solve(matrix, rhs), atol=1e-9)


def test_weights_are_the_pareto_point_alphas_and_the_step_is_the_tangent():
    for t in (0.2, 0.5, 0.8):
        update, method = explore(pareto_point(t), beta=(-1.0, 1.0))  # Jᵀβ = ∇L₂ − ∇L₁
        assert torch.allclose(method.last_alphas, torch.tensor([t, 1 - t], dtype=torch.float64), atol=1e-9)
        tangent = pareto_velocity(t)
        assert torch.allclose(update, tangent / tangent.norm(), atol=1e-8)  # v = H_α⁻¹ Jᵀβ = dx/dt


def test_a_step_leaves_the_set_only_to_second_order():
    x = pareto_point(0.5)
    update, _ = explore(x, beta=(1.0, 0.0))
    tangent_errors = [stationarity(x - s * update) for s in (0.02, 0.01)]
    assert 3.5 < tangent_errors[0] / tangent_errors[1] < 4.5  # O(s²)
    x.requires_grad_()
    naive = -per_task_gradients(losses(x), [x])[0].detach()
    naive_error = stationarity(x.detach() - 0.01 * naive / naive.norm())
    assert tangent_errors[1] < 0.05 * naive_error  # a plain gradient step of L₁ leaves at O(s)


def test_exploration_walks_along_the_front_and_stays_stationary():
    x = pareto_point(0.5)
    previous = losses(x)
    for _ in range(6):
        update, _ = explore(x, beta=(1.0, 0.0))
        x = x - 0.05 * update
        for _ in range(40):  # a few MGDA steps pull the point back onto the set
            y = x.clone().requires_grad_()
            x = x - 0.3 * MGDA()(per_task_gradients(losses(y), [y])).update
        current = losses(x)
        assert stationarity(x) < 1e-6
        assert current[0] < previous[0] and current[1] > previous[1]  # trades L₂ for L₁
        previous = current
    t = float(MGDA()(per_task_gradients(losses(x.requires_grad_()), [x])).weights[0])
    assert t > 0.6 and torch.allclose(x.detach(), pareto_point(t), atol=1e-5)


def test_on_a_network_minres_solves_the_hessian_system():
    problem = make_problem(seed=0)
    problem.model.double()
    problem.inputs, problem.targets = problem.inputs.double(), problem.targets.double()
    params = problem.shared_parameters()
    values = problem.losses()
    grads = per_task_gradients(values, params)
    hvp = weighted_hessian_vector_product(values, params)
    method = ContinuousParetoExploration((1.0, 0.0), damping=0.1, maxiter=None, tol=1e-13)  # H_α is indefinite here
    alphas = MGDA()(grads).weights
    direction = method.tangent(grads, alphas, hvp)
    d = grads.shape[1]
    hessian = torch.stack([hvp(alphas, e) for e in torch.eye(d, dtype=torch.float64)])  # column by column
    assert torch.allclose(hessian, hessian.T, atol=1e-10)
    expected = torch.linalg.solve(hessian + 0.1 * torch.eye(d, dtype=torch.float64), grads[0] / grads.abs().max())
    assert torch.allclose(direction, expected, atol=1e-6 * float(expected.abs().max()))


def test_identity_curvature_gives_the_scalarised_gradient(grad_checks):
    # H_α = I: v = Jᵀβ, the gradient of the linear scalarisation β · L.
    grads = grad_checks.gradient_matrix(3, 7, seed=1)
    beta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    update = ContinuousParetoExploration(beta)(grads, lambda alphas, v: v).update
    expected = beta @ grads
    assert torch.allclose(update, expected / expected.norm(), atol=1e-10)


def test_missing_curvature_and_mismatched_beta_are_rejected():
    with pytest.raises(ValueError, match="hvp"):
        ContinuousParetoExploration((1.0, 0.0))(torch.ones(2, 3))
    with pytest.raises(ValueError):
        ContinuousParetoExploration((1.0, 0.0))(torch.ones(3, 3), lambda a, v: v)
    with pytest.raises(ValueError):
        ContinuousParetoExploration((1.0, 0.0), damping=-1.0)


class WithCurvature(GradientMethod):
    """Adapter for the shared degenerate-input check: β = e₁ and a fixed SPD curvature."""

    def __call__(self, grads):
        d = grads.shape[1]
        curvature = torch.diag(torch.arange(1, d + 1, dtype=grads.dtype, device=grads.device))
        beta = torch.zeros(len(grads))
        beta[0] = 1.0
        return ContinuousParetoExploration(beta)(grads, lambda alphas, v: curvature @ v)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(WithCurvature)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(2, 5, seed=2).to(device)
    result = ContinuousParetoExploration((1.0, 0.0))(grads, lambda alphas, v: 2 * v)
    assert result.update.device == grads.device


def test_minres_starts_from_minus_the_mean_gradient():
    # H = diag(1, 0) is singular: MINRES only moves x inside the range of H (e₁ here), so the
    # second coordinate of v is the start's. Rows scaled by max|g| = 2: rhs = (2g₁ + g₂)/2 = (1, 0),
    # start = −mean = −((0.5, 0.5) + (0, −1))/2 = (−0.25, 0.25); v = (1, 0.25) solves H v = rhs.
    grads = torch.tensor([[1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
    update = ContinuousParetoExploration((2.0, 1.0))(grads, lambda alphas, v: mask * v).update
    expected = torch.tensor([1.0, 0.25], dtype=torch.float64)
    assert torch.allclose(update, expected / expected.norm(), atol=1e-12)


def test_minres_tolerance_is_relative_to_the_initial_residual():
    # The stopping rule compares with tol · ||rhs − A start||, so scaling rhs scales the answer
    # exactly, even when a loose tol stops MINRES before it converges.
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0], dtype=torch.float64))
    rhs = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    small, large = (minres(lambda v: matrix @ v, scale * rhs, tol=0.3) for scale in (1e-6, 1e6))
    assert torch.allclose(large, 1e12 * small, rtol=1e-9)
    assert not torch.allclose(small, torch.linalg.solve(matrix, 1e-6 * rhs), rtol=1e-3)  # stopped early


def test_default_settings_solve_a_thirty_dimensional_indefinite_system():
    """With the default tol and maxiter the unit step is (H_α)⁻¹Jᵀβ normalised, for d = 30."""
    generator = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    spectrum = torch.linspace(0.5, 6.0, 30, dtype=torch.float64) * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(15)
    curvature = q @ torch.diag(spectrum) @ q.T
    grads = torch.randn(3, 30, generator=generator, dtype=torch.float64)
    beta = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    update = ContinuousParetoExploration(beta)(grads, lambda alphas, v: curvature @ v).update
    expected = torch.linalg.solve(curvature, beta @ grads)
    assert torch.allclose(update, expected / expected.norm(), atol=1e-8)


def test_minres_returns_a_start_that_already_solves_the_system():
    # The initial residual is zero, so there is nothing to do: dividing by it would give NaN.
    matrix = torch.diag(torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64))
    solution = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    assert torch.equal(minres(lambda v: matrix @ v, matrix @ solution, start=solution), solution)
    assert torch.equal(minres(lambda v: matrix @ v, torch.zeros(3, dtype=torch.float64)), torch.zeros(3))


def krylov_least_squares(matrix, rhs, start, steps):
    """Brute-force MINRES iterate: argmin ||rhs − A x|| over x ∈ start + span{r, Ar, …, A^(steps−1) r}."""
    residual = rhs - matrix @ start
    basis = [residual]
    for _ in range(steps - 1):
        basis.append(matrix @ basis[-1])
    krylov = torch.stack(basis, dim=1)
    coefficients = torch.linalg.lstsq(matrix @ krylov, residual.unsqueeze(1)).solution.squeeze(1)
    return start + krylov @ coefficients


def test_the_tol_and_maxiter_settings_reach_the_solver():
    # MINRES after k steps is the residual minimiser over the k-dimensional Krylov space; it stops at
    # the first k whose residual is at most tol · ||r₀||, or at k = maxiter.
    generator = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    curvature = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, -4.0, 6.0, 9.0], dtype=torch.float64)) @ q.T
    grads = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    beta = torch.tensor([1.0, -0.5], dtype=torch.float64)
    rhs, start = beta @ grads, -grads.mean(0)  # the common scale of both drops out of v/||v||

    def unit(v):
        return v / v.norm()

    for maxiter in (1, 2, 3):
        update = ContinuousParetoExploration(beta, maxiter=maxiter)(grads, lambda a, v: curvature @ v).update
        assert torch.allclose(update, unit(krylov_least_squares(curvature, rhs, start, maxiter)), atol=1e-9)
    tol = 0.3
    initial = float((rhs - curvature @ start).norm())
    steps = next(k for k in range(1, 7)
                 if (rhs - curvature @ krylov_least_squares(curvature, rhs, start, k)).norm() <= tol * initial)
    assert steps < 6  # the loose tolerance does stop the solver early
    update = ContinuousParetoExploration(beta, tol=tol, maxiter=None)(grads, lambda a, v: curvature @ v).update
    assert torch.allclose(update, unit(krylov_least_squares(curvature, rhs, start, steps)), atol=1e-9)


def test_hvp_handles_unused_and_linear_parameters_and_mixed_dtypes():
    # Parameters that no loss uses, or that enter only linearly, have zero rows and columns in
    # H_α; α and v may come in another dtype than the model's.
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    values = losses(x) + shift
    hvp = weighted_hessian_vector_product(values, [x, shift, unused])
    alphas = torch.tensor([0.25, 0.75], dtype=torch.float32)
    vector = torch.tensor([1.0, -2.0, 0.5, 3.0, 4.0, -1.0], dtype=torch.float32)
    expected = torch.cat([(0.25 * A + 0.75 * B) @ vector[:3].double(), torch.zeros(3, dtype=torch.float64)])
    assert torch.allclose(hvp(alphas, vector).double(), expected, atol=1e-6)
    linear = weighted_hessian_vector_product(torch.stack([2 * x.sum(), x[0] - x[1]]), [x])
    assert torch.equal(linear(alphas, vector[:3]), torch.zeros(3))


def test_beta_keeps_full_precision_and_alphas_start_unset():
    # β given as Python floats must act in float64 on float64 gradients (H = I: v ∝ Jᵀβ), and
    # last_alphas stays None until the first call.
    grads = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    method = ContinuousParetoExploration((0.1, 1.0 / 3.0))
    assert method.last_alphas is None
    update = method(grads, lambda alphas, v: v).update
    expected = 0.1 * grads[0] + (1.0 / 3.0) * grads[1]
    assert torch.allclose(update, expected / expected.norm(), rtol=0, atol=1e-14)
    assert method.last_alphas is not None
