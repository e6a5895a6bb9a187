import itertools
import math

import numpy as np
import pytest
import torch

from reference_impls.weighting.base import GradientMethod
from reference_impls.weighting.epo import EPO, maximize_on_simplex, non_uniformity
from reference_impls.weighting.mgda import MGDA

CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def toy(theta):
    """Two convex losses ||θ − c_i||² + 0.5, bounded away from 0; Pareto set: the segment c_1 c_2."""
    diff = theta - CENTRES
    return diff.square().sum(1) + 0.5, 2 * diff


def epo_point(r):
    """θ on the segment with r_1 L_1 = r_2 L_2, by bisection on t (θ = c_1 + t (c_2 − c_1))."""
    low, high = 0.0, 1.0
    for _ in range(100):
        t = (low + high) / 2
        gap = r[0] * (2 * t**2 + 0.5) - r[1] * (2 * (1 - t) ** 2 + 0.5)
        low, high = (low, t) if gap > 0 else (t, high)
    return CENTRES[0] + t * (CENTRES[1] - CENTRES[0])


def brute_force_lp(objective, rows, lower):
    """Best vertex of {β >= 0, Σβ = 1, rows β >= lower}: K − 1 active inequalities plus Σβ = 1."""
    k = len(objective)
    inequalities = np.vstack([np.eye(k), rows])
    bounds = np.concatenate([np.zeros(k), lower])
    best = None
    for active in itertools.combinations(range(len(bounds)), k - 1):
        system = np.vstack([np.ones((1, k)), inequalities[list(active)]])
        if abs(np.linalg.det(system)) < 1e-12:
            continue
        beta = np.linalg.solve(system, np.concatenate([[1.0], bounds[list(active)]]))
        if (inequalities @ beta >= bounds - 1e-9).all():
            value = float(objective @ beta)
            best = value if best is None else max(best, value)
    return best


def test_simplex_solver_matches_vertex_enumeration():
    rng = np.random.default_rng(0)
    infeasible = 0
    for _ in range(300):
        k, m = int(rng.integers(2, 5)), int(rng.integers(0, 4))
        objective, rows = rng.normal(size=k), rng.normal(size=(m, k))
        lower = rng.normal(size=m) * 0.7
        beta = maximize_on_simplex(objective, rows, lower)
        expected = brute_force_lp(objective, rows, lower)
        if expected is None:
            infeasible += 1
            assert beta is None
            continue
        assert beta is not None and (beta >= 0).all() and abs(beta.sum() - 1) < 1e-9
        assert (rows @ beta >= lower - 1e-9).all()
        assert abs(float(objective @ beta) - expected) < 1e-9
    assert 0 < infeasible < 150  # both branches were exercised


def test_non_uniformity_is_the_kl_from_uniform_and_a_is_its_gradient():
    r = np.array([1.0, 2.0, 0.5])
    losses = np.array([0.7, 0.2, 1.5])
    mu, a, weighted = non_uniformity(losses, r)
    share = weighted / weighted.sum()
    assert abs(mu - float(np.sum(share * np.log(3 * share)))) < 1e-15
    on_ray, _, _ = non_uniformity(1 / r, r)
    assert abs(on_ray) < 1e-15
    # dμ/dL_j = a_j / Σ_i r_i L_i (checked with autograd on the definition).
    torch_losses = torch.tensor(losses, requires_grad=True)
    rl = torch.tensor(r) * torch_losses
    hat = rl / rl.sum()
    (hat * torch.log(3 * hat)).sum().backward()
    assert np.allclose(torch_losses.grad.numpy() * weighted.sum(), a, atol=1e-12)


@pytest.mark.parametrize("r", [(1.0, 3.0), (2.0, 1.0)])
def test_losses_converge_to_the_preference_ray_on_the_front(r):
    method = EPO(r, epsilon=1e-6)
    theta = torch.tensor([2.0, -1.5], dtype=torch.float64)
    modes = set()
    for _ in range(400):
        losses, grads = toy(theta)
        theta = theta - 0.05 * method(grads, losses).update
        modes.add(method.last_mode)
    losses = toy(theta)[0]
    rl = torch.tensor(r, dtype=torch.float64) * losses
    assert abs(float(rl[0] / rl[1]) - 1) < 5e-3  # r_1 L_1 = r_2 L_2
    assert torch.allclose(theta, epo_point(r), atol=5e-3)  # ... at the Pareto-optimal point
    assert modes == {"balance", "descent"}


def test_on_the_ray_the_direction_lowers_every_loss(grad_checks):
    r = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    for seed in range(20):
        grads = grad_checks.gradient_matrix(3, 6, seed)
        method = EPO(r)
        result = method(grads, losses=2.0 / r)  # r ⊙ L uniform: μ = 0
        assert method.last_mode == "descent" and (result.weights >= 0).all()
        decrease = grads @ result.update  # first-order decrease of each loss
        assert (decrease >= -1e-12).all() and result.update.norm() > 0
        # It maximises the total decrease among such directions, so it beats MGDA's.
        assert float(decrease.sum()) >= float((grads @ MGDA()(grads).update).sum()) - 1e-12


def test_near_the_ray_descent_keeps_the_step_from_leaving_it():
    """0 < μ <= ε: descent with βᵀCa >= min(max_j (Ca)_j, 0). g_2 = 2 g_1 and L = (0.6, 0.4) give
    a = (0.162, -0.243), so Ca = (a_1 + 2 a_2) (1, 2) < 0: the bound is (Ca)_1 and forces β = (1, 0);
    the relaxed LP takes the larger g_2 (β = (0, 1)). A bound of 0 would make the LP infeasible."""
    grads = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    losses = torch.tensor([0.6, 0.4], dtype=torch.float64)
    restricted, relaxed = EPO([1.0, 1.0], epsilon=0.1), EPO([1.0, 1.0], epsilon=0.1, restrict=False)
    assert torch.allclose(restricted(grads, losses).weights, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(relaxed(grads, losses).weights, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert restricted.last_mode == relaxed.last_mode == "descent"


def test_descent_lp_optimum_with_and_without_restriction(grad_checks):
    r = np.array([1.0, 2.0, 0.5])
    for seed in range(30):
        grads = grad_checks.gradient_matrix(3, 4, seed)
        losses = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
        gram = (grads @ grads.T).numpy()
        pull = gram @ non_uniformity(losses.numpy(), r)[1]
        cases = ((True, np.vstack([gram, pull]), np.append(np.zeros(3), min(pull.max(), 0.0))),
                 (False, gram, np.zeros(3)))
        for restrict, rows, lower in cases:
            method = EPO(r, epsilon=10.0, restrict=restrict)  # μ <= ε: always the descent LP
            update = method(grads, losses).update
            best = brute_force_lp(gram.sum(axis=0), rows, lower)
            if best is None:
                assert method.last_mode == "fallback"
                continue
            assert method.last_mode == "descent"
            assert abs(float((grads @ update).sum()) - best) <= 1e-9 * max(1.0, abs(best))


def test_balance_step_moves_toward_the_ray_without_raising_the_leading_loss():
    r = (1.0, 1.0)
    for t in (0.1, 0.25, 0.8):  # on the front, off the ray
        theta = CENTRES[0] + t * (CENTRES[1] - CENTRES[0])
        method = EPO(r)
        losses, grads = toy(theta)
        mu_before = non_uniformity(losses.numpy(), np.array(r))[0]
        step = method(grads, losses).update
        new_losses = toy(theta - 0.01 * step)[0]
        assert method.last_mode == "balance"
        assert non_uniformity(new_losses.numpy(), np.array(r))[0] < mu_before
        leading = int(losses.argmax())
        assert new_losses[leading] <= losses[leading]  # the loss ahead of the ray does not rise


def test_balance_constraints_hold_on_random_problems(grad_checks):
    # The leading task (largest r_j L_j) never rises; a task with g_j · d_bal <= 0 rises no
    # faster than along d_bal (controlled ascent); and d · d_bal is the LP's optimum.
    r = np.array([1.0, 2.0, 0.5])
    for seed in range(60):
        grads = grad_checks.gradient_matrix(3, 4, seed)
        losses = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
        method = EPO(r)
        update = method(grads, losses).update
        assert method.last_mode == "balance"
        _, a, weighted = non_uniformity(losses.numpy(), r)
        d_bal = torch.from_numpy(a) @ grads
        pull = grads @ d_bal
        decrease = grads @ update
        leading = int(np.argmax(weighted))
        assert decrease[leading] >= -1e-12
        if (pull > 0).any():
            capped = (pull <= 0) & (torch.arange(3) != leading)
            assert (decrease[capped] >= pull[capped] - 1e-12).all()
        gram = (grads @ grads.T).numpy()
        lower = np.where(pull.numpy() > 0, -np.inf, pull.numpy()) if (pull > 0).any() else np.zeros(3)
        lower[leading] = 0.0
        keep = np.isfinite(lower)
        best = brute_force_lp(pull.numpy(), gram[keep], lower[keep])
        assert abs(float(update @ d_bal) - best) <= 1e-9 * max(1.0, abs(best))


def test_infeasible_lp_falls_back_to_mgda(monkeypatch, grad_checks):
    import reference_impls.weighting.epo as epo_module

    monkeypatch.setattr(epo_module, "maximize_on_simplex", lambda *args: None)
    grads = grad_checks.gradient_matrix(3, 5, seed=2)
    method = EPO([1.0, 1.0, 1.0])
    result = method(grads, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert method.last_mode == "fallback"
    assert torch.allclose(result.weights, MGDA()(grads).weights, atol=1e-12)


def test_losses_are_required_and_must_be_non_negative(grad_checks):
    grads = grad_checks.gradient_matrix(2, 4, seed=1)
    with pytest.raises(ValueError, match="losses"):
        EPO([1.0, 1.0])(grads)
    with pytest.raises(ValueError, match="non-negative"):
        EPO([1.0, 1.0])(grads, torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match="positive"):
        EPO([1.0, 0.0])
    method = EPO([1.0, 1.0])
    method.observe(torch.tensor([1.0, 2.0]))
    assert torch.isfinite(method(grads).update).all()
    with pytest.raises(ValueError, match="losses"):  # consumed by the call
        method(grads)


class WithLosses(GradientMethod):
    """Adapter for the shared degenerate-input check: preference and losses sized to K."""

    def __init__(self, on_ray: bool) -> None:
        self.on_ray = on_ray  # equal losses: descent LP; unequal: balance LP

    def __call__(self, grads):
        k = len(grads)
        losses = torch.ones(k) if self.on_ray else torch.arange(1, k + 1, dtype=torch.float64)
        return EPO(torch.ones(k))(grads, losses)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(lambda: WithLosses(on_ray=True))
    grad_checks.check_degenerate_inputs(lambda: WithLosses(on_ray=False))


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(2, 9, seed=6).to(device)
    result = EPO([1.0, 2.0])(grads, torch.tensor([1.0, 2.0], device=device))
    assert result.update.device == grads.device and result.weights.device == grads.device
    assert math.isfinite(float(result.update.norm()))


# A balance case in which d_bal raises every loss to first order (all (Ca)_j <= 0).
NO_PULL_GRADS = torch.tensor([[-3.0, 3.0], [-2.0, -3.0], [-2.0, -1.0]], dtype=torch.float64)
NO_PULL_LOSSES = torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64)


def test_balance_with_no_task_pulled_down_keeps_every_loss_from_rising():
    """All (Ca)_j <= 0: balance then needs (Cβ)_j >= 0 for every j, not only the leading task.

    g = (−3, 3), (−2, −3), (−2, −1), L = (2, 2, 4), r = 1: a = s (−1, −1, 1) with s > 0, and
    C = [[18, −3, 3], [−3, 13, 7], [3, 7, 5]] gives Ca = s (−12, −3, −5). Maximising βᵀCa alone
    would take β = e_2, whose step raises L_1 (g_1 · g_2 = −3). With (Cβ)_1 = 18β_1 − 3β_2 + 3β_3
    >= 0 (and (Cβ)_2 >= 0) the best vertex is β = (0, ½, ½) with βᵀCa = −4s; the next best,
    (1/7, 6/7, 0), scores −30s/7."""
    grads, losses = NO_PULL_GRADS, NO_PULL_LOSSES
    method = EPO([1.0, 1.0, 1.0])
    result = method(grads, losses)
    assert method.last_mode == "balance"
    assert torch.allclose(result.weights, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(grads @ result.update, torch.tensor([0.0, 10.0, 6.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_weights_do_not_depend_on_the_scale_of_the_gradients(scale):
    """The LP is posed on the Gramian divided by its largest diagonal entry, so its tolerance is
    relative: scaling every gradient by 1e±8 gives the same β (same hand case as above)."""
    grads, losses = NO_PULL_GRADS, NO_PULL_LOSSES
    method = EPO([1.0, 1.0, 1.0])
    assert torch.allclose(method(scale * grads, losses).weights, method(grads, losses).weights, atol=1e-12)


def test_non_uniformity_counts_a_zero_loss_as_zero_in_mu():
    """μ uses 0 log 0 = 0: L = (0, 1), r = 1 gives l̂ = (0, 1) and μ = log 2 exactly; the zero
    share is raised to 1e-12 only inside a, where a_1 = log(2e-12) − log 2 stays finite."""
    mu, a, _ = non_uniformity(np.array([0.0, 1.0]), np.array([1.0, 1.0]))
    assert mu == pytest.approx(math.log(2), abs=1e-15)
    assert a[0] == pytest.approx(math.log(2e-12) - math.log(2), abs=1e-12)
    assert a[1] == pytest.approx(0.0, abs=1e-15)


def test_defaults_are_the_official_code_values():
    # ε = 1e-4, the default of EPO_LP(..., eps=1e-4) in the authors' epo_lp.py. With r = (1, 1):
    # L = (1, 1.2):  l̂ = (1/2.2, 1.2/2.2) = (0.454545, 0.545455)
    #   μ = 0.454545·ln(0.909091) + 0.545455·ln(1.090909) = −0.0433229 + 0.0474608 = 0.0041380 > 1e-4: balance
    # L = (1, 1.01): l̂ = (0.497512, 0.502488)
    #   μ = 0.497512·ln(0.995025) + 0.502488·ln(1.004975) = −0.0024813 + 0.0024938 = 0.0000124 < 1e-4: descent
    for losses, mu_by_hand, mode in [([1.0, 1.2], 0.0041380, "balance"), ([1.0, 1.01], 0.0000124, "descent")]:
        share = [x / sum(losses) for x in losses]
        mu = sum(s * math.log(2 * s) for s in share)
        assert abs(mu - mu_by_hand) < 1e-7
        method = EPO([1.0, 1.0])
        method(torch.eye(2, dtype=torch.float64), losses=torch.tensor(losses, dtype=torch.float64))
        assert method.last_mode == mode
    assert EPO([1.0, 1.0]).restrict  # the authors' default descent LP is the restricted one


def test_simplex_solver_matches_vertex_enumeration_on_degenerate_problems():
    """Small integer rows with bounds 0 or ±1 make many constraints tight at the same vertex
    (degenerate pivots, artificial variables left basic at level 0 after phase 1): the answer
    must still be feasible and optimal, as checked by enumerating the vertices."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        k, m = int(rng.integers(2, 5)), int(rng.integers(1, 6))
        objective = rng.integers(-2, 3, size=k).astype(float)
        rows = rng.integers(-2, 3, size=(m, k)).astype(float)
        lower = rng.integers(-1, 2, size=m).astype(float) * rng.integers(0, 2, size=m)
        beta = maximize_on_simplex(objective, rows, lower)
        expected = brute_force_lp(objective, rows, lower)
        if expected is None:
            assert beta is None
            continue
        assert beta is not None and (beta >= 0).all() and abs(beta.sum() - 1) < 1e-9
        assert (rows @ beta >= lower - 1e-9).all()
        assert abs(float(objective @ beta) - expected) < 1e-9


def test_zero_losses_are_accepted_and_all_zero_losses_count_as_on_the_ray():
    """Losses need only be >= 0. With every r_j L_j = 0 the non-uniformity is defined as μ = 0
    with a = 0, so the descent LP runs; a = 0 makes its extra bound βᵀCa >= 0 vacuous, so the
    step is the relaxed LP's: no loss rises and the total first-order decrease is the best
    vertex of {Cβ >= 0} (enumerated here)."""
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    mu, a, _ = non_uniformity(np.zeros(3), np.array([1.0, 2.0, 3.0]))
    assert mu == 0.0 and np.array_equal(a, np.zeros(3))
    method = EPO([1.0, 2.0, 3.0])
    update = method(grads, torch.zeros(3, dtype=torch.float64)).update
    assert method.last_mode == "descent"
    decrease = grads @ update
    assert (decrease >= -1e-12).all()
    gram = (grads @ grads.T).numpy()
    assert abs(float(decrease.sum()) - brute_force_lp(gram.sum(axis=0), gram, np.zeros(3))) < 1e-9
    method(grads, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))  # one zero loss: fine
    assert method.last_mode in ("balance", "descent")


def test_non_uniformity_with_one_zero_loss_among_three():
    """0 log 0 = 0 with K = 3: L = (0, 1, 1), r = 1 gives l̂ = (0, ½, ½) and μ = log(3/2)."""
    mu, a, _ = non_uniformity(np.array([0.0, 1.0, 1.0]), np.ones(3))
    assert mu == pytest.approx(math.log(1.5), abs=1e-15)
    assert a[1] == a[2] == pytest.approx(0.0, abs=1e-15)


def test_preference_losses_and_gradients_must_have_the_same_length(grad_checks):
    """A single preference (or loss) for several tasks would broadcast silently: refused."""
    grads = grad_checks.gradient_matrix(2, 4, seed=3)
    with pytest.raises(ValueError):
        EPO([1.0])(grads, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        EPO([1.0, 1.0])(grads, torch.tensor([1.0]))


def test_all_zero_gradients_give_uniform_weights_on_the_simplex():
    """Every β gives the zero update; the weights stay on the simplex (Σβ = 1), and the step
    is reported as the descent LP's (no loss can rise)."""
    method = EPO([1.0, 2.0, 3.0])
    result = method(torch.zeros(3, 4, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(result.weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-15)
    assert torch.equal(result.update, torch.zeros(4, dtype=torch.float64))
    assert method.last_mode == "descent"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constraints_that_only_hold_with_equality_keep_the_lp_feasible(dtype):
    """Opposite gradients g_2 = −g_1 can only both not rise along β_1 = β_2, where (Cβ)_j = 0
    exactly: the LP's bounds are relaxed by the Gramian's rounding, never tightened, so the LP
    stays feasible (no fallback).
    Descent: L on the ray. Balance: g_3 ⊥ g_1 and L = (2, 2, 1), r = 1: a_1 = a_2, so
    (Ca)_1 = (Ca)_2 = 0 and (Ca)_3 = a_3 < 0; no task is pulled down, every (Cβ)_j >= 0 is
    required, and the best of those steps (βᵀCa = a_3 β_3) is β = (½, ½, 0)."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=dtype)
    method = EPO([1.0, 1.0])
    result = method(g, torch.tensor([1.0, 1.0], dtype=dtype))
    assert method.last_mode == "descent"
    assert torch.allclose(result.weights, torch.tensor([0.5, 0.5], dtype=dtype))
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    method = EPO([1.0, 1.0, 1.0])
    result = method(g, torch.tensor([2.0, 2.0, 1.0], dtype=dtype))
    assert method.last_mode == "balance"
    assert torch.allclose(result.weights, torch.tensor([0.5, 0.5, 0.0], dtype=dtype), atol=1e-6)

