import inspect

import pytest
import torch

from reference_impls.architectures import mocha as mo
from reference_impls.architectures.mocha import MOCHA
from reference_impls.architectures.registry import Problem, build

from .procedure_names import unresolved_names

F64 = torch.float64
VEC = Problem(("a", "b"), (3,), {"a": 1, "b": 2})


def _devices(seed=0, n=20, d=4):
    """Three devices: 0 and 1 share a separator, 2 has its own."""
    g = torch.Generator().manual_seed(seed)
    base, other = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    truths = [base, base + 0.1 * torch.randn(d, generator=g, dtype=F64), other]
    xs = [torch.randn(n, d, generator=g, dtype=F64) for _ in truths]
    ys = [torch.sign(x @ w + 0.1 * torch.randn(n, generator=g, dtype=F64)) for x, w in zip(xs, truths)]
    return xs, ys


def _feasible(ys, g):
    """Random dual points inside the hinge loss's box: y_i alpha_i in [0, 1]."""
    return [y * torch.rand(len(y), generator=g, dtype=F64) for y in ys]


def _correlated_sigma(g, m=3):
    a = torch.randn(m, m, generator=g, dtype=F64) + 2 * torch.ones(m, m, dtype=F64)
    sigma = a @ a.T + 0.1 * torch.eye(m, dtype=F64)
    return sigma / torch.trace(sigma)


def test_objectives_by_hand():
    xs = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)]
    ys = [torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([1.0], dtype=F64)]
    w = torch.tensor([[0.5, 2.0], [1.0, -1.0]], dtype=F64)
    omega = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=F64)
    # device 0: margins 0.5, -2 -> hinge 0.5, 3 (mean 1.75); device 1: margin 1 -> 0
    reg = 0.1 / 2 * torch.trace(w @ omega @ w.T)
    assert mo.primal_objective(xs, ys, w, omega, 0.1).item() == pytest.approx(1.75 + reg.item())
    alphas = [torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.25], dtype=F64)]
    assert mo.dual_objective(alphas, ys, w, omega, 0.1).item() == pytest.approx(0.75 + 0.25 - reg.item())
    b = mo.sent_sums(xs, alphas)  # columns X_t^T alpha_t / n_t
    torch.testing.assert_close(b, torch.tensor([[0.25, 0.25], [-1.0, 0.25]], dtype=F64))


def test_weak_duality_at_the_primal_point_of_any_dual_point():
    g = torch.Generator().manual_seed(1)
    xs, ys = _devices()
    for _ in range(5):
        sigma = _correlated_sigma(g)
        alphas = _feasible(ys, g)
        w = mo.primal_from_dual(mo.sent_sums(xs, alphas), sigma, 0.05)
        omega = torch.linalg.inv(sigma)
        gap = mo.primal_objective(xs, ys, w, omega, 0.05) - mo.dual_objective(alphas, ys, w, omega, 0.05)
        assert gap.item() >= -1e-9


def test_local_models_add_up_to_no_more_than_the_dual_gain():
    """rho = max_t sum_s |Sigma_ts| / Sigma_tt: however all devices move at once, the summed
    local subproblems are a lower bound on the dual's gain; one device alone with rho = 1
    is exact; rho = 1 for all at once overstates the gain."""
    g = torch.Generator().manual_seed(2)
    xs, ys = _devices()
    lam, overstated = 0.05, False

    def dual(alphas, sigma):
        w = mo.primal_from_dual(mo.sent_sums(xs, alphas), sigma, lam)
        return mo.dual_objective(alphas, ys, w, torch.linalg.inv(sigma), lam)

    def model_sum(alphas, deltas, sigma, rho):
        w = mo.primal_from_dual(mo.sent_sums(xs, alphas), sigma, lam)
        return sum(mo.local_subproblem(x, y, dl, w[:, t], sigma[t, t].item(), rho, lam)
                   for t, (x, y, dl) in enumerate(zip(xs, ys, deltas)))

    for _ in range(20):
        sigma = _correlated_sigma(g)
        alphas = _feasible(ys, g)
        deltas = [new - old for new, old in zip(_feasible(ys, g), alphas)]
        gain = dual([a + dl for a, dl in zip(alphas, deltas)], sigma) - dual(alphas, sigma)
        assert model_sum(alphas, deltas, sigma, mo.safe_rho(sigma)) <= gain + 1e-9
        overstated |= bool(model_sum(alphas, deltas, sigma, 1.0) > gain + 1e-6)
        alone = [deltas[0], torch.zeros_like(deltas[1]), torch.zeros_like(deltas[2])]
        gain_alone = dual([a + dl for a, dl in zip(alphas, alone)], sigma) - dual(alphas, sigma)
        torch.testing.assert_close(model_sum(alphas, alone, sigma, 1.0), gain_alone)
    assert overstated


def test_local_sdca_maximises_the_local_subproblem_over_the_box():
    g = torch.Generator().manual_seed(3)
    xs, ys = _devices()
    x, y = xs[0], ys[0]
    w_t = torch.randn(x.shape[1], generator=g, dtype=F64)
    alpha = _feasible([y], g)[0]
    sigma_tt, rho, lam = 0.3, 2.5, 0.05
    value = lambda a: mo.local_subproblem(x, y, a - alpha, w_t, sigma_tt, rho, lam)
    order = mo.sweep_order(len(y), 2.0, g)
    values = [value(mo.local_sdca(x, y, alpha, w_t, sigma_tt, rho, lam, order[:k])[0]).item()
              for k in range(len(order) + 1)]  # coordinate by coordinate, G_t never goes down
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    best, sent = mo.local_sdca(x, y, alpha, w_t, sigma_tt, rho, lam, list(range(len(y))) * 100)
    torch.testing.assert_close(sent, x.T @ (best - alpha) / len(y))
    delta = (best - alpha).requires_grad_(True)
    (grad,) = torch.autograd.grad(mo.local_subproblem(x, y, delta, w_t, sigma_tt, rho, lam), delta)
    # KKT in u = y * alpha over [0, 1]: dG/du = y * dG/dalpha is 0 inside, <= 0 at 0, >= 0 at 1
    u, du = y * best, y * grad
    inside = (u > 1e-9) & (u < 1 - 1e-9)
    assert du[inside].abs().max() < 1e-6
    assert (du[u <= 1e-9] <= 1e-6).all() and (du[u >= 1 - 1e-9] >= -1e-6).all()
    for _ in range(20):  # and no other point of the box is better
        assert value(_feasible([y], g)[0]) <= value(best) + 1e-12


def test_relationship_step_is_the_closed_form_minimiser():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, generator=g, dtype=F64) @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    sigma, omega = mo.relationship(w)
    assert torch.trace(sigma).item() == pytest.approx(1.0)
    torch.testing.assert_close(sigma @ omega, torch.eye(3, dtype=F64))
    best = torch.trace(w @ omega @ w.T)
    singular = torch.linalg.svdvals(w)  # the minimum is (tr (W^T W)^{1/2})^2
    assert best.item() == pytest.approx(singular.sum().item() ** 2)
    for _ in range(30):
        other = _correlated_sigma(g) if _ % 2 else torch.diag(torch.rand(3, generator=g, dtype=F64) + 0.05)
        other = other / torch.trace(other)
        assert torch.trace(w @ torch.linalg.inv(other) @ w.T) >= best - 1e-9


def test_mocha_closes_the_gap_lowers_the_objective_and_finds_the_related_devices():
    xs, ys = _devices()
    run = mo.mocha(xs, ys, lam=0.01, rounds=4, inner=15, local_fraction=1.0,
                   generator=torch.Generator().manual_seed(0))
    gaps = [p - d for p, d in zip(run.primal, run.dual)]
    assert all(0 <= gap < 0.05 * p for gap, p in zip(gaps, run.primal))  # each round's W-problem is solved
    assert all(b <= a + 1e-3 for a, b in zip(run.primal, run.primal[1:])) and run.primal[-1] < run.primal[0] - 0.05
    corr = run.sigma / torch.outer(run.sigma.diagonal().sqrt(), run.sigma.diagonal().sqrt())
    assert corr[0, 1] > 0.7 and corr[0, 1] > corr[0, 2].abs() + 0.3 and corr[0, 1] > corr[1, 2].abs() + 0.3
    torch.testing.assert_close(run.w, mo.primal_from_dual(mo.sent_sums(xs, run.alphas), run.sigma, 0.01))


def test_a_device_that_does_no_work_leaves_its_dual_variables_alone():
    xs, ys = _devices()
    run = mo.mocha(xs, ys, lam=0.01, rounds=2, inner=3, local_fraction=[0.5, 1.0, 0.0])
    assert (run.alphas[2] == 0).all() and (run.alphas[0] != 0).any()
    with pytest.raises(ValueError, match="local_fraction"):
        mo.mocha(xs, ys, lam=0.01, local_fraction=[1.0, -1.0, 1.0])


def test_module_penalty_and_omega_updates():
    torch.manual_seed(0)
    model = build("mocha", VEC, lam=0.5, omega_every=2)
    w = model.weight_matrix().detach()
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 / 2 * 3 * (w * w).sum())  # Omega = m I at first
    model.observe_step_losses(torch.ones(2))
    torch.testing.assert_close(model.omega, 3 * torch.eye(3))  # not yet
    model.observe_step_losses(torch.ones(2))
    sigma, omega = mo.relationship(w)
    torch.testing.assert_close(model.omega, omega.to(model.omega.dtype))
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 / 2 * torch.trace(w @ model.omega @ w.T))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x)["b"], x @ model.weights["b"] + model.biases["b"])


def test_refusals_and_registry():
    with pytest.raises(ValueError, match="vector"):
        build("mocha", Problem(("a", "b"), (2, 4, 4)))
    for bad in ({"lam": -1.0}, {"omega_every": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build("mocha", VEC, **bad)
    model = build("mocha", VEC)
    assert type(model) is MOCHA and model.name == "mocha"
    assert unresolved_names(MOCHA) == []


def test_task_specific_parameters_are_the_tasks_own_weights(split_by_task):
    torch.manual_seed(0)
    model = build("mocha", VEC)
    for t, (own, reached) in split_by_task(model, torch.randn(5, 3)).items():
        assert own == reached == {f"weights.{t}", f"biases.{t}"}


def test_relationship_floors_the_eigenvalues_at_1e_7_before_the_square_root():
    # W^T W = diag(4, 0): roots (2, sqrt(1e-7)), Sigma = diag of the roots over their sum.
    w = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    sigma, omega = mo.relationship(w)
    root = 1e-7 ** 0.5
    torch.testing.assert_close(sigma, torch.diag(torch.tensor([2.0, root], dtype=F64)) / (2 + root))
    torch.testing.assert_close(omega, torch.diag(torch.tensor([(2 + root) / 2, (2 + root) / root], dtype=F64)))


def test_safe_rho_by_hand():
    # rows: (0.6 + 0.3) / 0.6 = 1.5 and (0.3 + 0.4) / 0.4 = 1.75: the largest, with absolute values
    assert mo.safe_rho(torch.tensor([[0.6, -0.3], [-0.3, 0.4]], dtype=F64)) == pytest.approx(1.75)


def test_local_sdca_skips_an_example_with_no_features():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    y = torch.tensor([1.0, -1.0], dtype=F64)
    alpha, sent = mo.local_sdca(x, y, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), 0.5, 1.0, 0.1, [0, 1])
    assert alpha[1] == 0 and alpha[0] != 0 and torch.isfinite(sent).all()


def test_sweep_order_cycles_through_a_random_permutation():
    orders = [mo.sweep_order(5, 2.0, torch.Generator().manual_seed(s)) for s in range(4)]
    for order in orders:
        assert sorted(order[:5]) == list(range(5)) and order[5:] == order[:5]
    assert len({tuple(o) for o in orders}) > 1  # random, not a fixed sweep
    assert len(mo.sweep_order(5, 0.5, torch.Generator().manual_seed(0))) == 2  # floor(fraction n)


def test_sweep_order_is_the_generators_permutation_read_at_j_mod_n_for_j_from_one():
    """Step j = 1..floor(fraction n) visits perm[j mod n] of the generator's randperm (1-based perm(mod(j, n) + 1))."""
    for n, fraction in ((7, 0.5), (5, 2.0), (6, 1.0)):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
        expected = [perm[j % n] for j in range(1, int(fraction * n) + 1)]
        assert mo.sweep_order(n, fraction, torch.Generator().manual_seed(3)) == expected, (n, fraction)


def test_every_device_in_a_round_reads_the_round_start_w_sigma_tt_and_the_safe_rho(monkeypatch):
    """The devices run in parallel: each reads column t of w(alpha) = B Sigma / lam from the
    alphas at the start of the inner round (not its neighbours' new ones), Sigma_tt and
    rho = safe_rho(Sigma) of the Sigma in use (I / m in round 0, then the relationship step's)."""
    xs, ys = _devices()
    calls, real = [], mo.local_sdca

    def spy(x, y, alpha, w_t, sigma_tt, rho, lam, order):
        calls.append((alpha.clone(), w_t.clone(), sigma_tt, rho))
        return real(x, y, alpha, w_t, sigma_tt, rho, lam, order)

    monkeypatch.setattr(mo, "local_sdca", spy)
    run = mo.mocha(xs, ys, lam=0.01, rounds=2, inner=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * 3 * 3
    for k in range(0, len(calls), 3):
        sigma = torch.eye(3, dtype=F64) / 3 if k < 9 else run.sigma
        alphas = [c[0] for c in calls[k:k + 3]]
        w = mo.primal_from_dual(mo.sent_sums(xs, alphas), sigma, 0.01)
        for t, (_, w_t, sigma_tt, rho) in enumerate(calls[k:k + 3]):
            torch.testing.assert_close(w_t, w[:, t])
            assert sigma_tt == pytest.approx(sigma[t, t].item()) and rho == pytest.approx(mo.safe_rho(sigma))
    assert mo.safe_rho(run.sigma) > 1.1  # round 1 tells rho = safe_rho apart from rho = 1


def test_defaults():
    """model_driver.m's 10 rounds of 100 inner iterations, half a pass each; lam 1e-4 and
    omega_every 100 for the module (ours)."""
    params = inspect.signature(mo.mocha).parameters
    assert (params["rounds"].default, params["inner"].default, params["local_fraction"].default) == (10, 100, 0.5)
    model = build("mocha", VEC)
    assert (model.lam, model.omega_every) == (1e-4, 100)


def test_an_example_with_no_features_does_not_stop_the_sweep():
    # the zero example comes first in the order: the examples after it are still visited
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=F64)
    y = torch.tensor([1.0, -1.0, -1.0], dtype=F64)
    alpha, _ = mo.local_sdca(x, y, torch.zeros(3, dtype=F64), torch.zeros(2, dtype=F64), 0.5, 1.0, 0.1, [1, 0, 2])
    assert alpha[1] == 0 and alpha[0] != 0 and alpha[2] != 0


def test_mocha_refuses_no_rounds_or_no_inner_iterations():
    xs, ys = _devices()
    for bad in ({"rounds": 0}, {"inner": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mo.mocha(xs, ys, lam=0.01, **bad)


def test_mocha_runs_on_a_single_device():
    # m = 1: Sigma = Omega = 1 throughout, a plain hinge-loss SVM solved in the dual
    xs, ys = _devices()
    run = mo.mocha(xs[:1], ys[:1], lam=0.01, rounds=2, inner=5, local_fraction=1.0,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run.sigma, torch.ones(1, 1, dtype=F64))
    assert 0 <= run.primal[-1] - run.dual[-1] < run.primal[0] - run.dual[0]  # weak duality, gap closing


def test_the_generator_alone_fixes_the_coordinate_order():
    # the sweeps draw from the given generator, not from the global random state
    xs, ys = _devices()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(mo.mocha(xs, ys, lam=0.01, rounds=1, inner=2, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(runs[0].alphas, runs[1].alphas)


def test_without_omega_updates_sigma_stays_the_starting_identity_over_m():
    xs, ys = _devices()
    run = mo.mocha(xs, ys, lam=0.01, rounds=3, inner=2, update_omega=False)
    torch.testing.assert_close(run.sigma, torch.eye(3, dtype=F64) / 3)
    torch.testing.assert_close(run.omega, torch.eye(3, dtype=F64) * 3)


def test_module_starts_from_unit_trace_sigma_inverse_to_omega_counts_steps_and_adds_biases():
    # Sigma = I / m and Omega = Sigma^{-1} (the code's start); the step counter counts up;
    # each task output is x W_t + b_t
    torch.manual_seed(0)
    model = build("mocha", VEC, omega_every=5)
    torch.testing.assert_close(model.sigma @ model.omega, torch.eye(3))
    assert torch.trace(model.sigma).item() == pytest.approx(1.0)
    for _ in range(2):
        model.observe_step_losses(torch.ones(2))
    assert int(model.steps) == 2
    with torch.no_grad():
        model.biases["b"].copy_(torch.tensor([1.0, -2.0]))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x)["b"], x @ model.weights["b"] + torch.tensor([1.0, -2.0]))
