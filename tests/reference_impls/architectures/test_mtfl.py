import pytest
import torch

from reference_impls.architectures import mtfl
from reference_impls.architectures.mtfl import MTFL
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})


def _shared_subspace_tasks(seed: int = 0, d: int = 10, tasks: int = 8, n: int = 20, k: int = 2):
    """Tasks whose true weights all lie in one k-dimensional subspace of R^d."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    w_true = basis @ torch.randn(k, tasks, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    ys = [x @ w_true[:, t] + 0.05 * torch.randn(n, generator=g, dtype=torch.float64) for t, x in enumerate(xs)]
    return xs, ys, w_true


def test_d_step_is_the_normalised_matrix_square_root():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # W W^T = diag(9, 1, 0)
    torch.testing.assert_close(mtfl.d_step(w), torch.diag(torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64)))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    d = mtfl.d_step(w)
    torch.testing.assert_close(d @ d, w @ w.T / torch.linalg.svdvals(w).sum() ** 2)  # trace((W W^T)^1/2) = sum sigma
    assert abs(torch.trace(d).item() - 1) < 1e-12


def test_d_step_at_zero_weights_and_eps_zero_is_the_small_eps_limit():
    # W = 0, eps = 0: the root is 0, so the normalisation is 0/0; eps = 1e-9 gives I / d.
    w = torch.zeros(4, 3, dtype=torch.float64)
    at, next_to = mtfl.d_step(w, 0.0), mtfl.d_step(w, 1e-9)
    torch.testing.assert_close(at, next_to, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(at, torch.eye(4, dtype=torch.float64) / 4)


def test_d_step_minimises_the_penalty_to_the_squared_trace_norm():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 4, generator=g, dtype=torch.float64)
    d = mtfl.d_step(w)  # eps = 0: rank-2 D, pseudo-inverse
    penalty = torch.trace(w.T @ torch.linalg.pinv(d, hermitian=True) @ w)
    torch.testing.assert_close(penalty, torch.linalg.svdvals(w).sum() ** 2)
    for _ in range(5):  # any other feasible D (trace 1, range containing W) is worse
        m = torch.randn(5, 5, generator=g, dtype=torch.float64)
        other = m @ m.T / torch.trace(m @ m.T)
        assert torch.trace(w.T @ torch.linalg.inv(other) @ w) > penalty


def test_w_step_is_the_per_task_minimiser():
    xs, ys, _ = _shared_subspace_tasks(n=6, tasks=2)
    d = mtfl.d_step(torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64), eps=0.1)
    w = mtfl.w_step(xs, ys, d, gamma=0.5)
    for t, (x, y) in enumerate(zip(xs, ys)):  # normal equations (X^T X + gamma D^{-1}) w = X^T y
        torch.testing.assert_close((x.T @ x + 0.5 * torch.linalg.inv(d)) @ w[:, t], x.T @ y)


def test_alternating_solver_decreases_and_objectives_agree_at_the_optimum():
    xs, ys, _ = _shared_subspace_tasks()
    w, d, history = mtfl.solve(xs, ys, gamma=1.0, iterations=60, eps=0.0)  # exact D-step, pinv
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))
    u = torch.linalg.eigh(d)[1]  # the learned features
    a = u.T @ w
    convex = mtfl.convex_objective(xs, ys, w, d, 1.0)
    torch.testing.assert_close(mtfl.feature_objective(xs, ys, u, a, 1.0), convex, rtol=1e-6, atol=1e-6)
    trace_norm_form = mtfl.squared_error(xs, ys, w) + 1.0 * torch.linalg.svdvals(w).sum() ** 2
    torch.testing.assert_close(convex, trace_norm_form, rtol=1e-6, atol=1e-6)


def test_learned_features_are_shared_low_rank():
    xs, ys, w_true = _shared_subspace_tasks(n=40)
    w, d, _ = mtfl.solve(xs, ys, gamma=5.0, iterations=100)
    s = torch.linalg.svdvals(w)
    assert s[2] < 1e-3 * s[1]  # two features carry all tasks
    ridge = mtfl.w_step(xs, ys, torch.eye(10, dtype=torch.float64) / 10, gamma=5.0)  # D fixed: no sharing
    assert torch.linalg.svdvals(ridge)[2] > 0.05 * torch.linalg.svdvals(ridge)[1]
    top = torch.linalg.eigh(d)[1][:, -2:]
    true_basis = torch.linalg.svd(w_true, full_matrices=False)[0][:, :2]
    assert torch.linalg.svdvals(top.T @ true_basis).min() > 0.97  # cosines of the principal angles to the truth


def test_module_reproduces_the_solver_solution_and_penalty():
    xs, ys, _ = _shared_subspace_tasks(d=5, tasks=2, n=15)
    w, d, _ = mtfl.solve(xs, ys, gamma=1.0, iterations=60, eps=1e-10)
    model = MTFL(("a", "b"), 5, {"a": 1, "b": 1}, gamma=1.0).double()
    u = torch.linalg.eigh(d)[1]
    with torch.no_grad():
        model.features.weight = u.T  # the parametrization maps it to itself (already orthogonal)
        model.coefficients["a"].copy_((u.T @ w)[:, :1])
        model.coefficients["b"].copy_((u.T @ w)[:, 1:])
    torch.testing.assert_close(model.feature_matrix(), u)
    out = model(xs[0])
    torch.testing.assert_close(out["a"][:, 0], xs[0] @ w[:, 0])
    torch.testing.assert_close(model.auxiliary_loss(), torch.linalg.svdvals(w).sum() ** 2, rtol=1e-6, atol=1e-6)


def test_module_penalty_features_and_gradients(params_with_grad):
    torch.manual_seed(0)
    model = build("mtfl", VEC, gamma=0.3)
    u = model.feature_matrix()
    torch.testing.assert_close(u.T @ u, torch.eye(5), atol=1e-5, rtol=0)
    a = torch.cat([model.coefficients["a"], model.coefficients["b"]], dim=1)  # 5 x 3
    by_hand = sum((a[i] ** 2).sum().sqrt() for i in range(5)) ** 2
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * by_hand)
    touched = params_with_grad(model, model(torch.randn(4, 5))["a"].sum())
    assert touched == {"features.parametrizations.weight.original", "coefficients.a", "biases.a"}


def test_module_training_lowers_loss_and_rejects_images(device, fit):
    torch.manual_seed(0)
    model = build("mtfl", VEC).to(device)
    x = torch.randn(32, 5, device=device)
    targets = {"a": x[:, :1] - x[:, 1:2], "b": x[:, 2:4]}
    losses = fit(model, x, lambda out: sum(((out[t] - targets[t]) ** 2).mean() for t in out), 30, 0.1)
    assert losses[-1] < 0.2 * losses[0]
    with pytest.raises(ValueError, match="vector"):
        build("mtfl", Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))


def test_registry_name_builds_the_catalogued_class():
    model = build("mtfl", VEC)
    assert type(model) is MTFL and model.name == "mtfl"


def test_task_specific_parameters_are_what_only_that_task_reaches(params_with_grad):
    """Each task's output reaches exactly U plus the parameters it claims (coefficients and bias)."""
    torch.manual_seed(0)
    model = build("mtfl", VEC)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {f"coefficients.{t}", f"biases.{t}"}
        touched = params_with_grad(model, model(torch.randn(4, 5))[t].sum())
        assert touched == own | {"features.parametrizations.weight.original"}


def test_matrix_square_root_clamps_negative_eigenvalues_at_zero():
    q = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    m = q @ torch.diag(torch.tensor([4.0, -1e-3], dtype=torch.float64)) @ q.T  # PSD up to rounding
    expected = q @ torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)) @ q.T
    torch.testing.assert_close(mtfl.sqrtm_psd(m), expected)


def test_one_solver_iteration_is_a_ridge_w_step_from_i_over_d_then_a_d_step():
    """From D = I / d the W-step is ridge with penalty gamma d ||w||^2; the D-step follows at once."""
    xs, ys, _ = _shared_subspace_tasks(d=4, tasks=3, n=8)
    gamma, eps, dim = 0.7, 1e-3, 4
    eye = torch.eye(dim, dtype=torch.float64)
    w = torch.stack([torch.linalg.solve(x.T @ x + gamma * dim * eye, x.T @ y) for x, y in zip(xs, ys)], dim=1)
    evals, evecs = torch.linalg.eigh(w @ w.T + eps * eye)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    got_w, got_d, history = mtfl.solve(xs, ys, gamma, iterations=1, eps=eps)
    torch.testing.assert_close(got_w, w)
    torch.testing.assert_close(got_d, root / evals.sqrt().sum())
    assert len(history) == 1


def test_convex_objective_gradient_in_w_by_hand():
    """d/dW [sum_t ||y_t - X_t w_t||^2 + gamma tr(W^T D^+ W)] = column t: -2 X_t^T (y_t - X_t w_t) + 2 gamma D^+ w_t."""
    xs, ys, _ = _shared_subspace_tasks(n=7, tasks=3)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    d = mtfl.d_step(torch.randn(10, 4, generator=g, dtype=torch.float64), eps=0.1)
    mtfl.convex_objective(xs, ys, w, d, 0.7).backward()
    d_inv = torch.linalg.inv(d)
    expected = torch.stack([-2 * x.T @ (y - x @ w.detach()[:, t]) + 2 * 0.7 * d_inv @ w.detach()[:, t]
                            for t, (x, y) in enumerate(zip(xs, ys))], dim=1)
    torch.testing.assert_close(w.grad, expected, rtol=1e-9, atol=1e-9)


def test_d_step_normalises_a_small_root_too():
    # W = (0.3, 0)^T: (W W^T)^{1/2} = diag(0.3, 0), trace 0.3 < 1, so D = diag(1, 0) (not I / d)
    w = torch.tensor([[0.3], [0.0]], dtype=torch.float64)
    torch.testing.assert_close(mtfl.d_step(w), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_the_solver_handles_a_single_task():
    # one task: D = w w^T / ||w||^2 after the first D-step; the objective never rises
    xs, ys, _ = _shared_subspace_tasks(d=4, tasks=1, n=10)
    w, d, history = mtfl.solve(xs, ys, gamma=0.5, iterations=5)
    assert w.shape == (4, 1) and torch.trace(d).item() == pytest.approx(1.0)
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))


def test_each_output_adds_its_task_bias():
    torch.manual_seed(0)
    model = build("mtfl", VEC)
    with torch.no_grad():
        model.biases["b"].copy_(torch.tensor([1.0, -2.0]))
    x = torch.randn(3, 5)
    torch.testing.assert_close(model(x)["b"], model.encode(x) @ model.coefficients["b"] + torch.tensor([1.0, -2.0]))
