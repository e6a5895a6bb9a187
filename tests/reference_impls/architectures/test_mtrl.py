import pytest
import torch

from reference_impls.architectures import mtrl
from reference_impls.architectures.mtrl import MTRL
from reference_impls.architectures.registry import Problem, build

from .conftest import pooled_one_block_trunk

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def _random_unit_trace_covariance(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    s = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
    return s / torch.trace(s)


def test_covariance_step_is_psd_unit_trace_and_minimises_the_penalty_for_fixed_w():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    omega = mtrl.task_covariance_step(w, eps=0.0)
    torch.testing.assert_close(omega, omega.T)
    assert torch.linalg.eigvalsh(omega).min() > 0 and abs(torch.trace(omega).item() - 1) < 1e-12
    best = mtrl.relationship_penalty(w, omega)
    torch.testing.assert_close(best, torch.linalg.svdvals(w).sum() ** 2)  # the minimum is ||W||_*^2
    for _ in range(20):  # no other feasible covariance does better
        assert mtrl.relationship_penalty(w, _random_unit_trace_covariance(4, g)) > best


def test_covariance_learns_positive_negative_and_absent_relations():
    g = torch.Generator().manual_seed(1)
    base, other = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    other = other - (other @ base) / (base @ base) * base  # orthogonal to base
    w = torch.stack([base, 0.8 * base, -base, other], dim=1)
    omega = mtrl.task_covariance_step(w, eps=0.0)
    corr = omega / torch.outer(omega.diag().sqrt(), omega.diag().sqrt())
    assert corr[0, 1] > 0.99 and corr[0, 2] < -0.99 and abs(corr[0, 3]) < 1e-8


def _linear_tasks():
    """Four regression tasks: two share weights, one is their negative, one is unrelated."""
    g = torch.Generator().manual_seed(2)
    d, n = 5, 12
    u, v = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    truth = torch.stack([u, u, -u, v], dim=1)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]
    ys = [x @ truth[:, t] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) for t, x in enumerate(xs)]
    return xs, ys


def test_weight_step_zeroes_the_gradient_and_alternation_lowers_the_objective():
    xs, ys = _linear_tasks()
    omega = _random_unit_trace_covariance(4, torch.Generator().manual_seed(3))
    w = mtrl.weight_step(xs, ys, omega, 0.1, 0.5).requires_grad_()
    mtrl.objective(xs, ys, w, omega, 0.1, 0.5).backward()
    assert w.grad.abs().max() < 1e-10
    w, omega, history = mtrl.solve(xs, ys, 0.1, 0.5, iterations=15, eps=0.0)
    assert all(b <= a + 1e-10 for a, b in zip(history, history[1:]))
    corr = omega / torch.outer(omega.diag().sqrt(), omega.diag().sqrt())
    assert corr[0, 1] > 0.5 and corr[0, 2] < -0.5 and abs(corr[0, 3]) < corr[0, 1]


def test_auxiliary_loss_by_hand_and_gradients_reach_only_the_output_layers(params_with_grad):
    torch.manual_seed(0)
    model = build("mtrl", VEC, width=4, depth=1, lambda1=0.3, lambda2=0.7)
    omega = _random_unit_trace_covariance(3, torch.Generator().manual_seed(4)).float()
    model.task_covariance.copy_(omega)
    w = torch.cat([model.heads["a"].weight.T, model.heads["b"].weight.T], dim=1)  # 4 x 3
    expected = 0.15 * w.square().sum() + 0.35 * torch.trace(w @ torch.linalg.inv(omega) @ w.T)
    torch.testing.assert_close(model.auxiliary_loss(), expected)
    assert params_with_grad(model, model.auxiliary_loss()) == {"heads.a.weight", "heads.b.weight"}


def test_forward_runs_the_covariance_step_in_training_mode_only(device):
    torch.manual_seed(0)
    model = build("mtrl", VEC, width=4, depth=1, update_every=2).to(device)
    start = model.task_covariance.clone()
    model.eval()
    model(torch.randn(3, 6, device=device))
    assert torch.equal(model.task_covariance, start)
    model.train()
    model(torch.randn(3, 6, device=device))
    torch.testing.assert_close(model.task_covariance, mtrl.task_covariance_step(model.weight_matrix().detach(), 1e-8))
    with torch.no_grad():
        model.heads["a"].weight.mul_(3.0)
    before = model.task_covariance.clone()
    model(torch.randn(3, 6, device=device))  # second call: no update (every 2)
    assert torch.equal(model.task_covariance, before)


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    for dense in (True, False):
        before, after = short_training("mtrl", dense, device, 30)
        assert after < 0.5 * before
    registry_output_shapes("mtrl", device)


def test_registry_name_and_task_specific_parameters(split_by_task):
    torch.manual_seed(0)
    model = build("mtrl", VEC, width=4)
    assert type(model) is MTRL and model.name == "mtrl"
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"heads.{t}.weight", f"heads.{t}.bias"}
        assert reached == own | trunk


def _unit_trace_root(a: torch.Tensor) -> torch.Tensor:
    """A^{1/2} / tr(A^{1/2}) for a symmetric PSD A, through its eigendecomposition."""
    values, vectors = torch.linalg.eigh(a)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    return root / torch.trace(root)


def test_covariance_step_adds_eps_before_the_square_root():
    w = torch.tensor([[3.0 ** 0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)  # W^T W = diag(3, 0)
    # (diag(3, 0) + I)^{1/2} = diag(2, 1), over its trace 3 (eps after the root would give diag(sqrt 3 + 1, 1))
    torch.testing.assert_close(mtrl.task_covariance_step(w, eps=1.0),
                               torch.tensor([[2 / 3, 0.0], [0.0, 1 / 3]], dtype=torch.float64))


def test_first_iteration_of_solve_by_hand_from_omega_i_over_t():
    xs, ys = _linear_tasks()
    lambda1, lambda2, eps, n_tasks = 0.1, 0.5, 0.3, 4
    # Omega = I / T makes M = (lambda1 + T lambda2) I: every task is a separate ridge regression
    ridge = lambda1 + n_tasks * lambda2
    w = torch.stack([torch.linalg.solve(2 / len(y) * x.T @ x + ridge * torch.eye(5, dtype=torch.float64),
                                        2 / len(y) * x.T @ y) for x, y in zip(xs, ys)], dim=1)
    omega = _unit_trace_root(w.T @ w + eps * torch.eye(n_tasks, dtype=torch.float64))
    got_w, got_omega, history = mtrl.solve(xs, ys, lambda1, lambda2, iterations=1, eps=eps)
    torch.testing.assert_close(got_w, w)
    torch.testing.assert_close(got_omega, omega)
    assert len(history) == 1


def test_model_starts_from_omega_i_over_t():
    torch.manual_seed(0)
    model = build("mtrl", VEC, width=4, depth=1, lambda1=0.0, lambda2=2.0)
    torch.testing.assert_close(model.task_covariance, torch.eye(3) / 3)  # 3 columns: 1 for a, 2 for b
    w = model.weight_matrix()
    torch.testing.assert_close(model.auxiliary_loss(), 3 * w.square().sum())  # lambda2 / 2 * T * ||W||^2


def test_image_level_tasks_read_the_spatial_mean_of_the_trunk_map(device):
    """Image-level tasks: each output layer w_t applied to the trunk's feature map averaged over space."""
    torch.manual_seed(0)
    model = build("mtrl", Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}), width=5, depth=1).double().to(device).eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=device)
    pooled = pooled_one_block_trunk(model, x)
    out = model(x)
    for t in ("a", "b"):
        expected = pooled @ model.heads[t].weight.T + model.heads[t].bias
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-12)


def _omega_of(model):
    return mtrl.task_covariance_step(model.weight_matrix().detach(), model.eps)


def test_covariance_step_runs_on_calls_1_3_5_with_update_every_2_and_on_every_call_by_default():
    """update_every=k: the Omega-step runs on training calls 1, k + 1, 2k + 1, ...; the default k is 1."""
    torch.manual_seed(0)
    for every, expected in ((2, [True, False, True, False, True]), (None, [True] * 4)):
        kwargs = {} if every is None else {"update_every": every}
        model = build("mtrl", VEC, width=4, depth=1, **kwargs)
        model.train()
        for should_update in expected:
            with torch.no_grad():
                model.heads["a"].weight.add_(torch.randn(model.heads["a"].weight.shape))
            before = model.task_covariance.clone()
            model(torch.randn(3, 6))
            if should_update:
                torch.testing.assert_close(model.task_covariance, _omega_of(model))
            else:
                assert torch.equal(model.task_covariance, before)


def test_documented_defaults_lambdas_1e_3_and_eps_1e_8():
    """The docstring's defaults: lambda1 = lambda2 = 1e-3, eps = 1e-8 added to W^T W before the root
    (for W^T W = diag(4, 1) the step is then diag(2, 1) / 3 to within 1e-8)."""
    model = MTRL(("a",), torch.nn.Identity(), 3, {"a": 2})
    assert (model.lambda1, model.lambda2, model.eps) == (1e-3, 1e-3, 1e-8)
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[2 / 3, 0.0], [0.0, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(mtrl.task_covariance_step(w), expected, rtol=0, atol=1e-7)
    # solve's default eps too: X_t = I, y = (1, 0) and (0, 2), Omega = I / 2, lambda1 + 2 lambda2 = 0.3, so
    # w_t = y_t / 1.3, W^T W = diag(1, 4) / 1.69 and Omega = diag(1, 2) / 3
    xs = [torch.eye(2, dtype=torch.float64)] * 2
    ys = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    _, omega, _ = mtrl.solve(xs, ys, 0.1, 0.1, iterations=1)
    torch.testing.assert_close(omega, torch.diag(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)), rtol=0, atol=1e-7)


def test_a_single_task_is_ridge_regression_with_lambda1_plus_lambda2():
    """One task: Omega is the 1 x 1 unit-trace matrix 1, so the W-step is a ridge fit with penalty
    (lambda1 + lambda2) / 2 ||w||^2 on the mean squared error: (2/n X^T X + (l1 + l2) I) w = 2/n X^T y."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    l1, l2 = 0.2, 0.3
    expected = torch.linalg.solve(2 / 12 * x.T @ x + (l1 + l2) * torch.eye(4, dtype=torch.float64), 2 / 12 * x.T @ y)
    w, omega, _ = mtrl.solve([x], [y], l1, l2, iterations=2)
    torch.testing.assert_close(w[:, 0], expected)
    torch.testing.assert_close(omega, torch.ones(1, 1, dtype=torch.float64))


def test_a_non_positive_eps_is_refused():
    with pytest.raises(ValueError):
        build("mtrl", VEC, width=4, depth=1, eps=0.0)
