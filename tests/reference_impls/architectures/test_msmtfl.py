import pytest
import torch

from reference_impls.architectures import msmtfl as ms
from reference_impls.architectures.msmtfl import MSMTFL
from reference_impls.architectures.registry import Problem, build

from .procedure_names import unresolved_names

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def test_capped_penalty_by_hand():
    w = torch.tensor([[0.5, -0.25, 0.0], [3.0, -1.0, 2.0], [0.0, 0.0, 0.0], [-0.6, 0.6, 0.0]])
    # row l1 norms 0.75, 6, 0, 1.2 -> capped at theta = 1: 0.75 + 1 + 0 + 1
    assert ms.capped_l1_l1(w, 1.0).item() == pytest.approx(2.75)
    assert ms.capped_l1_l1(w, 100.0).item() == pytest.approx(w.abs().sum().item())  # large theta: the l1,l1 norm
    big = w.clone()
    big[1] *= 10  # a feature above the cap costs no more when it grows
    assert ms.capped_l1_l1(big, 1.0) == ms.capped_l1_l1(w, 1.0)


def test_reweighting_rule_by_hand():
    w = torch.tensor([[0.5, -0.25], [3.0, -1.0], [0.0, 0.0], [-0.5, 0.5]])  # row l1: 0.75, 4, 0, 1
    torch.testing.assert_close(ms.stage_weights(w, 0.3, 1.0), torch.tensor([0.3, 0.0, 0.3, 0.0]))  # strict <


def _problem():
    """Five features used by all three tasks (|w| in [1, 2], random signs), 25 unused."""
    g = torch.Generator().manual_seed(0)
    d, tasks, n = 30, 3, 40
    w_true = torch.zeros(d, tasks, dtype=torch.float64)
    signs = torch.randint(0, 2, (5, tasks), generator=g).double() * 2 - 1
    w_true[:5] = (1.0 + torch.rand(5, tasks, generator=g, dtype=torch.float64)) * signs
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    ys = [x @ w_true[:, t] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) for t, x in enumerate(xs)]
    return xs, ys, w_true


def _support(w):
    return (w.abs() > 1e-6).any(dim=1).nonzero().flatten().tolist()


def test_first_stage_is_the_lasso():
    xs, ys, _ = _problem()
    _, history = ms.solve(xs, ys, lam=0.2, theta=1.0, stages=1, iterations=600)
    w = history[0]
    grad = torch.stack([x.T @ (x @ w[:, t] - y) / len(y) for t, (x, y) in enumerate(zip(xs, ys))], dim=1)
    active = w.abs() > 0  # lasso KKT: -grad = lambda sign(w) on the support, |grad| <= lambda off it
    torch.testing.assert_close(-grad[active], 0.2 * w[active].sign(), atol=1e-6, rtol=0)
    assert (grad[~active].abs() <= 0.2 + 1e-6).all()


def test_stages_recover_the_support_the_lasso_misses_and_lower_the_capped_objective():
    xs, ys, w_true = _problem()
    w, history = ms.solve(xs, ys, lam=0.2, theta=1.0, stages=3, iterations=600)
    assert len(_support(history[0])) > 5  # the lasso picks up spurious features
    assert _support(w) == [0, 1, 2, 3, 4]
    objectives = [ms.capped_objective(xs, ys, h, 0.2, 1.0).item() for h in history]
    assert all(b <= a + 1e-9 for a, b in zip(objectives, objectives[1:])) and objectives[-1] < objectives[0]
    # strong features end unpenalised: the result is least squares on the true support (no shrinkage)
    oracle = torch.stack([torch.linalg.lstsq(x[:, :5], y).solution for x, y in zip(xs, ys)], dim=1)
    torch.testing.assert_close(w[:5], oracle, atol=1e-5, rtol=0)
    assert (w - w_true).norm() < 0.2 * (history[0] - w_true).norm()


def test_module_penalty_and_gradients(params_with_grad):
    model = build("msmtfl", VEC, lam=0.5, theta=1.0)
    with torch.no_grad():
        model.weights["a"].copy_(torch.tensor([[2.0], [0.25], [0.0], [0.0]]))
        model.weights["b"].copy_(torch.tensor([[1.0, 0.0], [0.0, -0.25], [0.0, 0.0], [0.0, 0.5]]))
    # rows of W (4 x 3): l1 = 3, 0.5, 0, 0.5 -> capped 1 + 0.5 + 0 + 0.5
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(0.5 * 2.0))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x)["b"], x @ model.weights["b"] + model.biases["b"])
    assert params_with_grad(model, model(x)["a"].sum()) == {"weights.a", "biases.a"}
    touched = params_with_grad(model, model.auxiliary_loss())
    assert touched == {"weights.a", "weights.b"}  # weights.a row 0 is capped: only its row 1 gets gradient
    assert model.weights["a"].grad[0].item() == 0.0


def test_module_training_lowers_loss_and_rejects_images(device, fit):
    torch.manual_seed(0)
    model = build("msmtfl", VEC).to(device)
    x = torch.randn(32, 4, device=device)
    targets = {"a": x[:, :1], "b": x[:, :2] - x[:, 2:]}
    losses = fit(model, x, lambda out: sum(((out[t] - targets[t]) ** 2).mean() for t in out), 40, 0.1)
    assert losses[-1] < 0.1 * losses[0]
    with pytest.raises(ValueError, match="vector"):
        build("msmtfl", Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))


def test_registry_name_builds_the_catalogued_class():
    model = build("msmtfl", VEC)
    assert type(model) is MSMTFL and model.name == "msmtfl"


def test_task_specific_parameters_are_what_only_that_task_reaches(params_with_grad):
    """No parameter is shared: each task claims its column block of W and its bias, all its output reads."""
    model = build("msmtfl", VEC)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {f"weights.{t}", f"biases.{t}"}
        assert params_with_grad(model, model(torch.randn(5, 4))[t].sum()) == own


def test_the_procedure_line_names_methods_of_the_class_and_functions_of_the_module():
    """A bare name() in the printed line is a method of the class, a module-level function is
    written module.name() (the line used to name stage_weights() as if it were a method of MSMTFL)."""
    assert unresolved_names(MSMTFL) == []
    assert "msmtfl.stage_weights()" in MSMTFL.training_procedure


def test_each_stage_reweights_by_the_stage_before_it_by_hand():
    """One task, X^T X / n = [[1, -1/2], [-1/2, 1]], X^T y / n = (2, 0.3), lambda 1/2, theta 1.
    Stage 1 (both penalised): w = (28, 11) / 15, so feature 0 is strong. Stage 2 (feature 1
    alone penalised): w = (38, 16) / 15, now feature 1 is strong too. Stage 3 (none penalised):
    least squares, (43, 26) / 15. Each stage solves G w = b - lambda_j sign(w_j)."""
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([4.6, 3.4, 0.0, 0.0], dtype=torch.float64)
    _, history = ms.solve([x], [y], lam=0.5, theta=1.0, stages=3, iterations=500)
    expected = torch.tensor([[28.0, 11.0], [38.0, 16.0], [43.0, 26.0]], dtype=torch.float64) / 15
    torch.testing.assert_close(torch.stack([h[:, 0] for h in history]), expected, atol=1e-8, rtol=0)


def test_capped_objective_by_hand():
    # residuals (3 - 1, 0.5 - 0) -> 4.25 / (2 * 2); capped rows min(3, 1) + min(0.5, 1) = 1.5, times 0.2
    x, y = torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    w = torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    assert ms.capped_objective([x], [y], w, 0.2, 1.0).item() == pytest.approx(1.0625 + 0.3)


def test_a_task_output_is_its_linear_map_plus_its_bias():
    """y_t = x W_t + b_t, with non-zero weights and biases written in."""
    model = build("msmtfl", VEC)
    with torch.no_grad():
        for k, t in enumerate(VEC.tasks):
            model.weights[t].copy_(torch.arange(4.0 * VEC.task_out_dims[t]).reshape(4, -1) - k)
            model.biases[t].copy_(torch.full((VEC.task_out_dims[t],), 2.0 + k))
    x = torch.randn(3, 4)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], x @ model.weights[t] + model.biases[t])
        torch.testing.assert_close(model(x)[t] - model(torch.zeros(1, 4))[t], x @ model.weights[t])
        assert model(torch.zeros(1, 4))[t].tolist() == [model.biases[t].tolist()]


def test_the_solvers_use_the_given_start_and_iteration_count():
    """ISTA continues from ``start`` (zero steps return it), and solve() passes its iteration count on:
    its first stage equals that many lasso steps from zero."""
    xs, ys, _ = _problem()
    start = torch.randn(xs[0].shape[1], len(xs), dtype=xs[0].dtype)
    torch.testing.assert_close(ms.weighted_lasso(xs, ys, torch.full((xs[0].shape[1],), 0.2), start, 0), start)
    _, history = ms.solve(xs, ys, lam=0.2, theta=1.0, stages=1, iterations=3)
    torch.testing.assert_close(history[0], ms.weighted_lasso(xs, ys, torch.full((xs[0].shape[1],), 0.2),
                                                             iterations=3))
