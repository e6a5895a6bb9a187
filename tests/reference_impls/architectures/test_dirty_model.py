import pytest
import torch

from reference_impls.architectures import dirty_model as dm
from reference_impls.architectures.dirty_model import DirtyModel
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def test_penalty_by_hand():
    b = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [-0.5, 0.5, 0.25]])
    s = torch.tensor([[0.0, 1.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    assert dm.l1_inf_norm(b).item() == 3.5  # max |.| per row: 3 + 0 + 0.5
    assert dm.dirty_penalty(b, s, 2.0, 0.5).item() == 2.0 * 3.5 + 0.5 * 3.5


def test_prox_operators_by_hand():
    torch.testing.assert_close(dm.soft_threshold(torch.tensor([3.0, -0.5, -2.0]), 1.0), torch.tensor([2.0, 0.0, -1.0]))
    # t ||x||_inf with v = (3, 1, -2), t = 2: clip at tau with (3 - tau) + (2 - tau) = 2, tau = 1.5
    out = dm.prox_rows_linf(torch.tensor([[3.0, 1.0, -2.0]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, -1.5]]))
    assert dm.prox_rows_linf(torch.tensor([[1.0, -2.0]]), 5.0).abs().max() == 0  # ||v||_1 <= t: zero


def test_l1_ball_projection_is_feasible_and_idempotent():
    v = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    p = dm.project_rows_l1_ball(v, 1.5)
    norms = p.abs().sum(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1.5))  # these rows were all outside
    torch.testing.assert_close(dm.project_rows_l1_ball(p, 1.5), p)


@pytest.mark.parametrize("which", ("l1", "linf"))
def test_prox_is_the_minimiser(which):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = 0.7
    norm = (lambda x: x.abs().sum(dim=1)) if which == "l1" else (lambda x: x.abs().amax(dim=1))
    prox = dm.soft_threshold(v, t) if which == "l1" else dm.prox_rows_linf(v, t)

    def objective(x):  # per row: 1/2 ||x - v||^2 + t ||x||
        return 0.5 * ((x - v) ** 2).sum(dim=1) + t * norm(x)

    best = objective(prox)
    for scale in (1e-1, 1e-2, 1e-3):
        for _ in range(50):
            assert (objective(prox + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)) >= best - 1e-12).all()


def _dirty_problem():
    """Rows 0-3 used by every task with equal magnitudes; rows 4-9 by one task each."""
    g = torch.Generator().manual_seed(0)
    d, tasks, n = 20, 3, 60
    w_true = torch.zeros(d, tasks, dtype=torch.float64)
    w_true[:4] = torch.randint(0, 2, (4, tasks), generator=g).double() * 2 - 1
    for k in range(tasks):
        w_true[4 + 2 * k : 6 + 2 * k, k] = 1.0
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    ys = [x @ w_true[:, k] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) for k, x in enumerate(xs)]
    return xs, ys, w_true


def test_solver_recovers_shared_and_private_supports():
    xs, ys, _ = _dirty_problem()
    b, s = dm.solve(xs, ys, lambda_b=0.3, lambda_s=0.15, iterations=400)
    shared_rows = (b.abs() > 1e-3).any(dim=1).nonzero().flatten().tolist()
    assert shared_rows == [0, 1, 2, 3] and (b[:4].abs() > 1e-3).all()
    private = sorted(map(tuple, (s.abs() > 1e-3).nonzero().tolist()))
    assert private == [(4, 0), (5, 0), (6, 1), (7, 1), (8, 2), (9, 2)]


def test_solver_output_is_a_local_hence_global_minimum():
    xs, ys, _ = _dirty_problem()
    b, s = dm.solve(xs, ys, lambda_b=0.3, lambda_s=0.15, iterations=400)
    objective = dm.squared_loss(xs, ys, b + s) + dm.dirty_penalty(b, s, 0.3, 0.15)
    for scale in (1e-2, 1e-3):  # no nearby point is better: the convex problem's minimum
        g = torch.Generator().manual_seed(2)
        for _ in range(20):
            db, ds = (scale * torch.randn(b.shape, generator=g, dtype=torch.float64) for _ in range(2))
            other = dm.squared_loss(xs, ys, b + db + s + ds) + dm.dirty_penalty(b + db, s + ds, 0.3, 0.15)
            assert other >= objective - 1e-9


def test_one_solver_iteration_by_hand():
    """From B = S = 0: one gradient step on the loss of W = B + S (the same gradient for B and S),
    step 1 / L with L = 2 max_t ||X_t||_2^2 / n_t (twice W's constant), then each part's prox."""
    f64 = dict(dtype=torch.float64)
    xs = [torch.eye(2, **f64), 2 * torch.eye(2, **f64)]  # ||X_t||^2 / n_t = 1/2 and 2 -> L = 4, step 1/4
    ys = [torch.tensor([8.0, 0.0], **f64), torch.tensor([4.0, -8.0], **f64)]
    # gradient at W = 0: X^T (0 - y) / n = -y / 2 and -y; minus a quarter of it, features x tasks:
    v = torch.tensor([[1.0, 1.0], [0.0, -2.0]], **f64)
    b, s = dm.solve(xs, ys, lambda_b=2.0, lambda_s=1.0, iterations=1)  # thresholds 0.5 and 0.25
    # B's rows minus their projection onto the l1 ball of radius 0.5: [1, 1] -> [0.25, 0.25]
    # ((1 - theta) * 2 = 0.5, theta = 0.75) and [0, -2] -> [0, -0.5]
    torch.testing.assert_close(b, v - torch.tensor([[0.25, 0.25], [0.0, -0.5]], **f64))
    torch.testing.assert_close(s, torch.tensor([[0.75, 0.75], [0.0, -1.75]], **f64))  # v soft-thresholded at 0.25


def test_ratio_outside_the_range_leaves_one_part_empty():
    xs, ys, _ = _dirty_problem()
    b, _ = dm.solve(xs, ys, lambda_b=1.0, lambda_s=0.3, iterations=200)  # lambda_s / lambda_b < 1/T
    assert b.abs().max() == 0
    _, s = dm.solve(xs, ys, lambda_b=0.2, lambda_s=0.3, iterations=200)  # lambda_s > lambda_b
    assert s.abs().max() == 0


def test_module_penalty_and_gradients(params_with_grad):
    model = build("dirty_model", VEC, lambda_b=0.5, lambda_s=0.25)
    with torch.no_grad():
        model.shared["a"].copy_(torch.tensor([[1.0], [0.0], [2.0], [0.0]]))
        model.shared["b"].copy_(torch.tensor([[-3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        model.private["b"][3, 1] = -4.0
    # rows of B (4 x 3): max |.| = 3, 1, 2, 0 -> 6; ||S||_1 = 4
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(0.5 * 6 + 0.25 * 4))
    # B is features x (all tasks' outputs, in task order): a's column, then b's two
    expected_b = torch.tensor([[1.0, -3.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(model.b_matrix(), expected_b)
    assert model.s_matrix()[3].tolist() == [0.0, 0.0, -4.0]
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x)["b"], x @ (model.shared["b"] + model.private["b"]) + model.biases["b"])
    touched = params_with_grad(model, model(x)["a"].sum())
    assert touched == {"shared.a", "private.a", "biases.a"}


def test_module_training_lowers_loss_and_rejects_images(device, fit):
    torch.manual_seed(0)
    model = build("dirty_model", VEC).to(device)
    x = torch.randn(32, 4, device=device)
    targets = {"a": x[:, :1], "b": x[:, :2] - x[:, 2:]}
    losses = fit(model, x, lambda out: sum(((out[t] - targets[t]) ** 2).mean() for t in out), 40, 0.1)
    assert losses[-1] < 0.1 * losses[0]
    with pytest.raises(ValueError, match="vector"):
        build("dirty_model", Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))


def test_registry_name_builds_the_catalogued_class():
    model = build("dirty_model", VEC)
    assert type(model) is DirtyModel and model.name == "dirty_model"


def test_squared_loss_is_one_over_2n_per_task_by_hand():
    """The scale the solver's gradient step assumes: 1/(2 n_t) ||y_t - X_t w_t||^2 summed over tasks."""
    xs = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])]
    ys = [torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0, 3.0])]
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # residuals (0, 2) and (1, 2, -3)
    assert dm.squared_loss(xs, ys, w).item() == pytest.approx(4 / 4 + 14 / 6)


def test_task_specific_parameters_are_what_only_that_task_reaches(split_by_task):
    """No parameter is shared: each task claims B's and S's columns and the bias its output reads."""
    model = build("dirty_model", VEC)
    for t, (own, reached) in split_by_task(model, torch.randn(5, 4)).items():
        assert own == {f"shared.{t}", f"private.{t}", f"biases.{t}"}
        assert reached == own


def test_one_task_is_the_lasso_with_the_cheaper_penalty():
    """With T = 1, ||B||_{1,inf} = ||B||_1, so only W = B + S matters and the optimum pays
    min(lambda_b, lambda_s) ||W||_1: for a design with X^T X / n = I that is the soft
    threshold of X^T y / n (closed form)."""
    g = torch.Generator().manual_seed(0)
    n, d = 8, 3
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    x = q * n**0.5  # orthogonal columns of squared norm n
    y = x @ torch.tensor([1.0, -0.05, 0.4], dtype=torch.float64) + 0.01 * torch.randn(n, generator=g)
    b, s = dm.solve([x], [y], lambda_b=0.1, lambda_s=0.2, iterations=2000)
    expected = dm.soft_threshold(x.T @ y / n, 0.1)
    torch.testing.assert_close((b + s)[:, 0], expected, atol=1e-6, rtol=0)


def test_module_is_xw_plus_bias_and_default_lambdas_are_in_the_papers_range():
    """Each task predicts x (B_t + S_t) + bias_t; the default lambdas satisfy 1/T < lambda_s/lambda_b < 1
    for three tasks, so neither part is forced to zero."""
    torch.manual_seed(0)
    model = DirtyModel(("a", "b", "c"), 4, {"a": 1, "b": 2, "c": 1})
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 4)
    out = model(x)
    for t in model.tasks:
        torch.testing.assert_close(out[t], x @ model.shared[t] + x @ model.private[t] + model.biases[t])
    assert 1 / 3 < model.lambda_s / model.lambda_b < 1
