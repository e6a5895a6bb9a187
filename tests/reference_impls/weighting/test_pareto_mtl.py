import math

import pytest
import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import Aggregation, GradientMethod
from reference_impls.weighting.gradients import gradient_step
from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.pareto_mtl import ParetoMTL, two_task_preferences

CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def toy(theta):
    """Two convex losses ||θ − c_i||² + 0.1; the Pareto set is the segment between the centres."""
    diff = theta - CENTRES
    return diff.square().sum(1) + 0.1, 2 * diff


def unit(v):
    return v / v.norm()


def test_paper_preferences_are_evenly_spread_unit_vectors():
    prefs = two_task_preferences(5)
    assert torch.allclose(prefs.norm(dim=1), torch.ones(5, dtype=torch.float64))
    angles = torch.atan2(prefs[:, 1], prefs[:, 0])
    assert torch.allclose(angles, torch.linspace(0, math.pi / 2, 5, dtype=torch.float64))


def test_no_active_constraint_reduces_to_mgda(grad_checks):
    prefs = two_task_preferences(5)
    for seed in range(10):
        grads = grad_checks.gradient_matrix(2, 6, seed)
        method = ParetoMTL(prefs, index=2, epsilon=0.01)
        result = method(grads, losses=3.0 * prefs[2])  # on u_k: G_j = cos(22.5° or 45°) − 1 < −ε
        assert not method.searching_initial
        mgda = MGDA()(grads)
        assert (result.weights >= 0).all()
        assert torch.allclose(result.weights, mgda.weights, atol=1e-12)
        assert torch.allclose(result.update, mgda.update, atol=1e-12)


def test_initial_search_lowers_every_violated_constraint(grad_checks):
    prefs = two_task_preferences(5)
    losses = torch.tensor([1.0, 0.05], dtype=torch.float64)  # near u_0: outside the sector of u_3
    for seed in range(10):
        grads = grad_checks.gradient_matrix(2, 6, seed)
        method = ParetoMTL(prefs, index=3)
        result = method(grads, losses)
        assert method.searching_initial  # still infeasible: phase 1 (Eq. 9)
        offsets = prefs - prefs[3]
        violated = offsets @ unit(losses) > 0
        constraint_grads = offsets[violated] @ grads  # ∇G_j, Eq. (17)
        # Phase 1 ignores the loss gradients: it is MGDA on the violated constraints alone ...
        assert torch.allclose(result.update, MGDA()(constraint_grads).update, atol=1e-12)
        # ... so the step lowers each of them: ∇G_j · d >= ||d||² > 0.
        assert (constraint_grads @ result.update >= (result.update @ result.update) * (1 - 1e-9)).all()


def test_constrained_direction_is_mgda_on_losses_and_active_constraints(grad_checks):
    prefs = two_task_preferences(4)
    losses = unit(prefs[1] + 0.6 * prefs[2])  # inside sector 1, near its border with sector 2
    for seed in range(10):
        grads = grad_checks.gradient_matrix(2, 5, seed)
        method = ParetoMTL(prefs, index=1, epsilon=0.2)
        result = method(grads, losses)
        offsets = prefs - prefs[1]
        active = (offsets.abs().amax(1) > 0) & (offsets @ losses >= -0.2)  # I_ε, Eq. (11)
        assert active.sum() == 1
        hull = torch.cat([grads, offsets[active] @ grads])  # {∇L_i} ∪ {∇G_j}, Eq. (10)
        expected = MGDA()(hull)
        assert torch.allclose(result.update, expected.update, atol=1e-12)
        # Eq. (18): α_i = λ_i + Σ_j β_j (u_ji − u_ki); and −d lowers every loss and active G_j.
        lam, beta = method.last_multipliers[:2], method.last_multipliers[2:]
        assert torch.allclose(result.weights, lam + beta @ offsets[active], atol=1e-12)
        assert (hull @ result.update >= (result.update @ result.update) * (1 - 1e-9) - 1e-15).all()


def test_loss_scale_and_preference_lengths_do_not_change_the_direction(grad_checks):
    """Feasibility is judged on L / ||L|| (so ε is relative) and preferences are made unit."""
    prefs = two_task_preferences(4)
    losses = unit(prefs[1] + 0.6 * prefs[2])  # G_2 in [−ε, 0): active only at the unit scale
    lengths = torch.tensor([[1.0], [3.0], [0.5], [2.0]], dtype=torch.float64)
    for seed in range(3):
        grads = grad_checks.gradient_matrix(2, 5, seed)
        reference = ParetoMTL(prefs, index=1, epsilon=0.2)(grads, losses)
        scaled = ParetoMTL(prefs, index=1, epsilon=0.2)(grads, 50 * losses)
        shrunk = ParetoMTL(prefs, index=1, epsilon=0.2)(grads, 0.02 * losses)  # ||L|| < 1 is normalised too
        stretched = ParetoMTL(lengths * prefs, index=1, epsilon=0.2)(grads, losses)
        for other in (scaled, shrunk, stretched):
            assert torch.allclose(other.weights, reference.weights, atol=1e-12)
        assert not torch.allclose(reference.weights, MGDA()(grads).weights)  # the constraint acts


def run_toy(index, prefs, steps=1000, lr=0.05):
    method = ParetoMTL(prefs, index=index)
    theta = torch.tensor([2.0, 2.5], dtype=torch.float64)
    for _ in range(steps):
        losses, grads = toy(theta)
        theta = theta - lr * method(grads, losses).update
    return theta, toy(theta)[0], method


def test_each_run_ends_on_the_front_in_its_own_sector():
    prefs = two_task_preferences(5)
    ratios = []
    for index in range(5):
        theta, losses, method = run_toy(index, prefs)
        assert not method.searching_initial
        closeness = prefs @ unit(losses)  # the run's own u_k must be (about) the closest
        assert closeness[index] >= closeness.max() - 1e-3
        assert abs(float(theta.sum()) - 1) < 1e-3 and -1e-3 <= float(theta[1]) <= 1 + 1e-3  # on the front
        ratios.append(float(losses[1] / losses[0]))
    assert ratios == sorted(ratios)  # more weight on task 2's axis -> relatively larger L_2


def test_losses_come_through_observe_for_gradient_step():
    problem = make_problem(seed=0)
    shared, heads = problem.shared_parameters(), list(problem.model.heads.parameters())
    method = ParetoMTL(two_task_preferences(3), index=1)
    losses = problem.losses()
    method.observe(losses)
    aggregation = gradient_step(method, losses, shared, task_params=heads)
    assert torch.isfinite(aggregation.update).all()
    with pytest.raises(ValueError, match="losses"):  # consumed: a stale loss vector is never reused
        gradient_step(method, problem.losses(), shared, task_params=heads)


def test_invalid_preferences_are_rejected():
    with pytest.raises(ValueError):
        ParetoMTL(torch.tensor([[1.0, -0.5], [0.0, 1.0]]), index=0)
    with pytest.raises(ValueError):
        ParetoMTL(two_task_preferences(3), index=3)
    with pytest.raises(ValueError):  # one zero row among non-zero ones has no direction
        ParetoMTL(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), index=0)
    with pytest.raises(ValueError):
        two_task_preferences(1)
    assert torch.allclose(two_task_preferences(2), torch.eye(2, dtype=torch.float64), atol=1e-15)  # 2 is enough
    with pytest.raises(ValueError, match="losses"):  # never observed: the documented refusal
        ParetoMTL(two_task_preferences(3), index=0)(torch.ones(2, 4))


def test_integer_preferences_are_accepted_as_directions(grad_checks):
    """Preferences given as integers (e.g. [[1, 0], [0, 1]]) mean the same directions as floats."""
    grads = grad_checks.gradient_matrix(2, 4, seed=0)
    losses = torch.tensor([2.0, 2.0], dtype=torch.float64)
    expected = ParetoMTL(torch.eye(2, dtype=torch.float64), index=0)(grads, losses)
    for prefs in ([[1, 0], [0, 1]], torch.tensor([[1, 0], [0, 1]])):
        result = ParetoMTL(prefs, index=0)(grads, losses)
        assert torch.allclose(result.weights, expected.weights, atol=1e-12)
    with pytest.raises(ValueError):  # 3 tasks against 2-d preferences
        ParetoMTL(two_task_preferences(3), index=0)(torch.ones(3, 4), torch.ones(3))


class WithPreferencesFor(GradientMethod):
    """Adapter for the shared degenerate-input check: preferences and losses sized to K."""

    def __call__(self, grads):
        k = len(grads)
        prefs = torch.cat([torch.eye(k), torch.ones(1, k)])  # K axes and the diagonal
        losses = torch.arange(1, k + 1, dtype=torch.float64)
        return ParetoMTL(prefs, index=k, epsilon=0.1)(grads, losses)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(WithPreferencesFor)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(2, 9, seed=6).to(device)
    result = ParetoMTL(two_task_preferences(3), index=1)(grads, torch.tensor([1.0, 2.0], device=device))
    assert isinstance(result, Aggregation)
    assert result.update.device == grads.device and result.weights.device == grads.device


@pytest.mark.parametrize("max_init_steps", [0, 1, 3])
def test_initial_search_stops_after_max_init_steps(grad_checks, max_init_steps):
    """Losses kept outside the sector: exactly ``max_init_steps`` phase-1 calls, then the
    constrained descent (MGDA on the losses and the active constraints) for good."""
    prefs = two_task_preferences(5)
    losses = torch.tensor([1.0, 0.05], dtype=torch.float64)  # near u_0: outside the sector of u_3
    grads = grad_checks.gradient_matrix(2, 6, seed=0)
    offsets = prefs - prefs[3]
    violated = offsets @ unit(losses) > 0
    phase_1 = MGDA()(offsets[violated] @ grads).update
    phase_2 = MGDA()(torch.cat([grads, offsets[violated] @ grads])).update  # violated => active
    method = ParetoMTL(prefs, index=3, max_init_steps=max_init_steps)
    for call in range(max_init_steps + 2):
        update = method(grads, losses).update
        assert method.searching_initial == (call < max_init_steps)
        assert torch.allclose(update, phase_1 if call < max_init_steps else phase_2, atol=1e-12)


def test_a_constraint_on_its_boundary_is_active_at_the_default_epsilon(grad_checks):
    """I_ε = {j : G_j >= −ε} with ε = 0 keeps G_j = 0: u = e_1, e_2, run 0, L = (2, 2) gives
    G_1 = (−1, 1) · L / ||L|| = 0 exactly, so ∇G_1 = g_2 − g_1 joins the hull."""
    prefs = torch.eye(2, dtype=torch.float64)
    losses = torch.tensor([2.0, 2.0], dtype=torch.float64)
    for seed in range(5):
        grads = grad_checks.gradient_matrix(2, 4, seed)
        method = ParetoMTL(prefs, index=0)
        result = method(grads, losses)
        assert not method.searching_initial  # G_1 = 0 is feasible: no initial search
        expected = MGDA()(torch.cat([grads, (grads[1] - grads[0])[None]]))
        assert torch.allclose(result.update, expected.update, atol=1e-12)
        zero = ParetoMTL(prefs, index=0)(grads, torch.zeros(2, dtype=torch.float64))  # every G_j = 0 as well
        assert torch.allclose(zero.update, expected.update, atol=1e-12)
        assert not torch.allclose(result.update, MGDA()(grads).update)  # the constraint acts


def test_the_initial_search_lasts_at_most_100_steps_by_default(grad_checks):
    """The documented default schedule: 100 phase-1 steps while infeasible, then the constrained descent."""
    prefs = two_task_preferences(5)
    losses = torch.tensor([1.0, 0.05], dtype=torch.float64)  # near u_0: outside the sector of u_3
    grads = grad_checks.gradient_matrix(2, 3, seed=0)
    method = ParetoMTL(prefs, index=3)
    for _ in range(100):
        method(grads, losses)
    assert method.searching_initial
    method(grads, losses)
    assert not method.searching_initial
