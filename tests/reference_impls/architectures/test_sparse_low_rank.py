import pytest
import torch

from reference_impls.architectures import sparse_low_rank as sl
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.sparse_low_rank import SparseLowRank

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def test_trace_ball_projection_by_hand():
    v = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    # singular values (3, 1, 0.5) onto the l1 ball of radius 2: shift by 1 -> (2, 0, 0)
    torch.testing.assert_close(sl.project_trace_norm_ball(v, 2.0), torch.diag(torch.tensor([2.0, 0.0, 0.0])))
    inside = 0.1 * v
    torch.testing.assert_close(sl.project_trace_norm_ball(inside, 2.0), inside)


def test_both_steps_are_the_exact_minimisers():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    proj = sl.project_trace_norm_ball(v, 1.5)
    torch.testing.assert_close(torch.linalg.svdvals(proj).sum(), torch.tensor(1.5, dtype=torch.float64))
    p = sl.soft_threshold(v, 0.7)

    def prox_objective(x):  # 1/2 ||x - v||^2 + 0.7 ||x||_1
        return 0.5 * ((x - v) ** 2).sum() + 0.7 * x.abs().sum()

    for _ in range(200):
        other = proj + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        other = other * min(1.0, 1.5 / torch.linalg.svdvals(other).sum().item())  # any feasible point
        assert (other - v).norm() >= (proj - v).norm() - 1e-12
        assert prox_objective(p + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64)) >= prox_objective(p)


def _problem():
    """Six tasks on one shared direction (rank 1) plus two task-specific outlier weights."""
    g = torch.Generator().manual_seed(0)
    d, tasks, n = 15, 6, 50
    q_true = torch.randn(d, 1, generator=g, dtype=torch.float64) @ torch.randn(1, tasks, generator=g, dtype=torch.float64)
    p_true = torch.zeros(d, tasks, dtype=torch.float64)
    p_true[3, 1], p_true[10, 4] = 3.0, -3.0
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    w = p_true + q_true
    ys = [x @ w[:, t] + 0.05 * torch.randn(n, generator=g, dtype=torch.float64) for t, x in enumerate(xs)]
    return xs, ys, p_true, q_true


def test_solver_recovers_the_sparse_outliers_and_the_low_rank_part():
    xs, ys, p_true, q_true = _problem()
    tau = torch.linalg.svdvals(q_true).sum().item()
    p, q = sl.solve(xs, ys, gamma=0.2, tau=tau, iterations=600)
    assert sorted(map(tuple, (p.abs() > 1e-3).nonzero().tolist())) == [(3, 1), (10, 4)]
    s = torch.linalg.svdvals(q)
    assert s.sum() <= tau + 1e-9 and s[1] < 0.1 * s[0]  # feasible and close to rank one
    assert (p + q - p_true - q_true).norm() < 0.15 * (p_true + q_true).norm()
    best = sl.objective(xs, ys, p, q, 0.2)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # no nearby feasible point is better: the convex problem's minimum
        dp, dq = (1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64) for _ in range(2))
        q2 = sl.project_trace_norm_ball(q + dq, tau)
        assert sl.objective(xs, ys, p + dp, q2, 0.2) >= best - 1e-9


def test_module_penalty_and_gradients(params_with_grad):
    model = build("sparse_low_rank", VEC, gamma=0.5, beta=0.25)
    with torch.no_grad():
        model.sparse["b"][1, 0] = -2.0
        model.low_rank["a"].zero_()
        model.low_rank["b"].copy_(torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
    # ||P||_1 = 2; Q = [0 | diag-like]: singular values 4, 3 -> 7
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(0.5 * 2 + 0.25 * 7))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x)["b"], x @ (model.sparse["b"] + model.low_rank["b"]) + model.biases["b"])
    assert params_with_grad(model, model(x)["a"].sum()) == {"sparse.a", "low_rank.a", "biases.a"}


def test_module_training_lowers_loss_and_rejects_images(device, fit):
    torch.manual_seed(0)
    model = build("sparse_low_rank", VEC).to(device)
    x = torch.randn(32, 4, device=device)
    targets = {"a": x[:, :1], "b": x[:, :2] - x[:, 2:]}
    losses = fit(model, x, lambda out: sum(((out[t] - targets[t]) ** 2).mean() for t in out), 40, 0.1)
    assert losses[-1] < 0.1 * losses[0]
    with pytest.raises(ValueError, match="vector"):
        build("sparse_low_rank", Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))


def test_registry_name_builds_the_catalogued_class():
    model = build("sparse_low_rank", VEC)
    assert type(model) is SparseLowRank and model.name == "sparse_low_rank"


def test_task_specific_parameters_are_what_only_that_task_reaches(split_by_task):
    """No parameter is shared: each task claims its P and Q columns and the bias, all its output reads."""
    model = build("sparse_low_rank", VEC)
    for t, (own, reached) in split_by_task(model, torch.randn(5, 4)).items():
        assert own == {f"sparse.{t}", f"low_rank.{t}", f"biases.{t}"}
        assert reached == own


def test_one_solver_iteration_by_hand():
    """From P = Q = 0 with X_t = I (n = 2): step 1 / (2 * 1/2) = 1 and the gradient is -Y / 2,
    so both parts start from V = Y / 2 = diag(2, 1): P = soft(V, gamma), Q = the projection of V.
    A second step, again from the same W = P + Q for both parts, is worked out as well."""
    eye = torch.eye(2, dtype=torch.float64)
    xs, ys = [eye, eye], [torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    p, q = sl.solve(xs, ys, gamma=0.5, tau=2.0, iterations=1)
    torch.testing.assert_close(p, torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64)))
    # singular values (2, 1) onto the l1 ball of radius 2: shift by 1/2
    torch.testing.assert_close(q, torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64)))
    # second step: W = diag(3, 1), gradient (W - Y) / 2 = diag(-1/2, -1/2)
    # P: soft(diag(2, 1), 1/2) = diag(1.5, 0.5); Q: diag(2, 1) projected again = diag(1.5, 0.5)
    p, q = sl.solve(xs, ys, gamma=0.5, tau=2.0, iterations=2)
    torch.testing.assert_close(p, torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64)))
    torch.testing.assert_close(q, torch.diag(torch.tensor([1.5, 0.5], dtype=torch.float64)))


def test_forward_is_x_times_p_plus_q_plus_the_bias_by_hand():
    torch.manual_seed(0)
    model = SparseLowRank(("a", "b"), 4, {"a": 1, "b": 2})
    with torch.no_grad():
        for t in model.tasks:
            model.sparse[t].normal_()
            model.biases[t].normal_()
    x = torch.randn(3, 4)
    for t, out in model(x).items():
        torch.testing.assert_close(out, x @ model.sparse[t] + x @ model.low_rank[t] + model.biases[t])


def test_solver_on_a_single_task_with_no_penalty_is_least_squares():
    """One task, gamma 0 and a loose trace-norm ball: the minimiser is the least-squares fit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise
    p, q = sl.solve([x], [y], gamma=0.0, tau=100.0, iterations=2000)
    torch.testing.assert_close((p + q)[:, 0], torch.linalg.lstsq(x, y[:, None]).solution[:, 0], atol=1e-6, rtol=0)
