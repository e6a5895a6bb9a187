import torch

from reference_impls.architectures import go_mtl
from reference_impls.architectures.go_mtl import GOMTL
from reference_impls.architectures.registry import Problem, build

from .conftest import pooled_one_block_trunk
from .procedure_names import unresolved_names

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def _tasks():
    """Six linear tasks on 6 features built from 3 basis tasks: tasks 0-2 use bases 0 and 1,
    tasks 3-5 use bases 1 and 2 (two groups that overlap in basis 1)."""
    g = torch.Generator().manual_seed(0)
    d, n = 6, 30
    basis = torch.randn(d, 3, generator=g, dtype=torch.float64)
    codes = torch.zeros(3, 6, dtype=torch.float64)
    codes[:2, :3] = 1 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    codes[1:, 3:] = 1 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(6)]
    ys = [x @ (basis @ codes[:, t]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
          for t, x in enumerate(xs)]
    return xs, ys


def test_output_layer_weights_are_exactly_basis_times_codes(device):
    torch.manual_seed(0)
    model = build("go_mtl", VEC, width=5, depth=1, num_bases=3).to(device)
    x = torch.randn(4, 6, device=device)
    z = model.trunk(x)
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], z @ (model.basis @ model.codes[t]) + model.biases[t])
    assert model.weight_matrix().shape == (5, 3)
    torch.testing.assert_close(model.weight_matrix(), torch.cat([model.basis @ model.codes[t] for t in "ab"], 1))
    dense = build("go_mtl", Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True), width=5, depth=1).to(device)
    x = torch.randn(2, 2, 4, 4, device=device)
    z = dense.trunk(x)
    expected = torch.einsum("bdhw,do->bohw", z, dense.basis @ dense.codes["a"]) + dense.biases["a"].view(1, -1, 1, 1)
    torch.testing.assert_close(dense(x)["a"], expected)


def test_s_step_satisfies_the_lasso_optimality_conditions():
    xs, ys = _tasks()
    basis = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes = go_mtl.s_step(xs, ys, basis, mu=2.0, start=torch.zeros(3, 6, dtype=torch.float64), iterations=1500)
    for t, (x, y) in enumerate(zip(xs, ys)):
        a, s = x @ basis, codes[:, t]
        grad = 2 * a.T @ (a @ s - y)  # -grad = mu sign(s) on the support, |grad| <= mu off it
        on = s != 0
        torch.testing.assert_close(-grad[on], 2.0 * s[on].sign(), atol=1e-6, rtol=0)
        assert (grad[~on].abs() <= 2.0 + 1e-6).all()


def test_l1_term_zeroes_codes_exactly_and_more_of_them_as_mu_grows():
    xs, ys = _tasks()
    basis = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    start = torch.zeros(3, 6, dtype=torch.float64)
    # above max |2 A_t^T y_t| the zero code is optimal for every task
    threshold = max((2 * (x @ basis).T @ y).abs().max().item() for x, y in zip(xs, ys))
    assert torch.count_nonzero(go_mtl.s_step(xs, ys, basis, 1.01 * threshold, start, 50)) == 0
    mus = (0.0, 30.0, 300.0, 0.9 * threshold)
    zeros = [int((go_mtl.s_step(xs, ys, basis, mu, start, 200) == 0).sum()) for mu in mus]
    assert zeros[0] == 0 and zeros == sorted(zeros) and zeros[1] < zeros[-1] < 18


def test_l_step_is_the_exact_minimiser_and_alternation_lowers_the_objective():
    xs, ys = _tasks()
    codes = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    basis = go_mtl.l_step(xs, ys, codes, lam=0.5).requires_grad_()
    go_mtl.objective(xs, ys, basis, codes, mu=1.0, lam=0.5).backward()
    assert basis.grad.abs().max() < 1e-8
    basis, codes, history = go_mtl.solve(xs, ys, num_bases=3, mu=1.0, lam=0.5, iterations=6,
                                           lasso_iterations=100)
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:]))
    assert go_mtl.squared_error(xs, ys, basis @ codes) < 0.05 * sum((y**2).sum() for y in ys)


def test_auxiliary_loss_by_hand_and_gradients(params_with_grad):
    torch.manual_seed(0)
    model = build("go_mtl", VEC, width=4, depth=1, num_bases=2, mu=0.5, lam=0.25)
    with torch.no_grad():
        model.codes["a"].copy_(torch.tensor([[1.0], [-2.0]]))
        model.codes["b"].copy_(torch.tensor([[0.0, 0.5], [3.0, 0.0]]))
        model.basis.fill_(0.5)  # ||L||_F^2 = 8 x 0.25 = 2
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(0.5 * 6.5 + 0.25 * 2.0))
    assert params_with_grad(model, model.auxiliary_loss()) == {"basis", "codes.a", "codes.b"}


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    for dense in (True, False):
        before, after = short_training("go_mtl", dense, device, 30)
        assert after < 0.5 * before
    registry_output_shapes("go_mtl", device)


def test_registry_name_and_task_specific_parameters(split_by_task):
    torch.manual_seed(0)
    model = build("go_mtl", VEC, width=4)
    assert type(model) is GOMTL and model.name == "go_mtl"
    shared = {n for n, _ in model.named_parameters() if n.startswith("trunk.")} | {"basis"}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"codes.{t}", f"biases.{t}"}
        assert reached == own | shared
    assert unresolved_names(GOMTL) == []


_A = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # ||A||_2 = 2: ISTA step 1 / (2 x 4)
_Y = torch.tensor([4.0, 4.0], dtype=torch.float64)


def test_objective_by_hand():
    basis = 2 * torch.eye(2, dtype=torch.float64)  # ||L||_F^2 = 8
    codes = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)  # W = (2, -4), ||S||_1 = 3
    # squared error: (4 - 2)^2 + (4 + 8)^2 = 148; mu = 3, lambda = 0.5: 148 + 9 + 4
    value = go_mtl.objective([_A], [_Y], basis, codes, mu=3.0, lam=0.5)
    torch.testing.assert_close(value, torch.tensor(161.0, dtype=torch.float64))


def test_one_ista_step_by_hand_reaches_the_lasso_minimiser():
    # from 0: 0 + (1/8) 2 A^T y = (1, 2), soft-thresholded by mu / 8 = 1: (0, 1), where
    # (4 - s1)^2 + (4 - 2 s2)^2 + 8 (|s1| + |s2|) has its minimum (s1 = 0; -4 (4 - 2 s2) + 8 = 0)
    s = go_mtl.lasso(_A, _Y, mu=8.0, start=torch.zeros(2, dtype=torch.float64), iterations=1)
    torch.testing.assert_close(s, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_solve_starts_from_ridge_singular_vectors_and_warm_starts_each_s_step():
    """L starts as the top-k left singular vectors of per-task ridge weights; each S-step starts
    from the previous codes (one ISTA step per S-step makes the start visible)."""
    xs, ys = _tasks()
    mu, lam = 1.0, 0.5
    eye = torch.eye(6, dtype=torch.float64)
    ridge = torch.stack([torch.linalg.solve(x.T @ x + lam * eye, x.T @ y) for x, y in zip(xs, ys)], dim=1)
    basis = torch.linalg.svd(ridge, full_matrices=False)[0][:, :3]
    codes = torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(2):
        codes = go_mtl.s_step(xs, ys, basis, mu, codes, iterations=1)
        basis = go_mtl.l_step(xs, ys, codes, lam)
    got_basis, got_codes, _ = go_mtl.solve(xs, ys, num_bases=3, mu=mu, lam=lam, iterations=2, lasso_iterations=1)
    torch.testing.assert_close(got_codes, codes)
    torch.testing.assert_close(got_basis, basis)


def test_image_level_tasks_read_the_spatial_mean_of_the_trunk_map(device):
    """Image-level tasks: W = L S_t applied to the trunk's feature map averaged over space."""
    torch.manual_seed(0)
    model = build("go_mtl", Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}), width=5, depth=1).double().to(device)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=device)
    pooled = pooled_one_block_trunk(model, x)
    out = model(x)
    for t in ("a", "b"):
        expected = pooled @ (model.basis @ model.codes[t]) + model.biases[t]
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-12)


def test_each_task_adds_its_own_bias_to_l_s_t_z(device):
    """Output t = (L S_t)^T z + b_t; the biases start at zero, so give them values first."""
    torch.manual_seed(0)
    model = build("go_mtl", VEC, width=5, depth=1, num_bases=3).to(device)
    with torch.no_grad():
        for t in VEC.tasks:
            model.biases[t].copy_(torch.randn(model.biases[t].shape))
    x = torch.randn(4, 6, device=device)
    z = model.trunk(x)
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], z @ (model.basis @ model.codes[t]) + model.biases[t])


def test_ista_uses_step_one_over_lipschitz_for_a_small_design_too():
    """A = c I with c = 0.25 (Lipschitz constant 2 c^2 < 1): one step from 0 with step 1 / (2 c^2) gives
    soft(y / c, mu / (2 c^2)), the exact minimiser of ||y - c s||^2 + mu |s|: (4, -0.4) shrunk by 1.6."""
    a = 0.25 * torch.eye(2, dtype=torch.float64)
    y = torch.tensor([1.0, -0.1], dtype=torch.float64)
    s = go_mtl.lasso(a, y, mu=0.2, start=torch.zeros(2, dtype=torch.float64), iterations=1)
    torch.testing.assert_close(s, torch.tensor([2.4, 0.0], dtype=torch.float64))


def test_a_single_task_gets_its_ridge_start_and_closed_form_l_step():
    """One task: ridge weights are (X^T X + lam I)^-1 X^T y, and with one basis and code c the L-step is
    the ridge fit of the design c X: (c^2 X^T X + lam I)^-1 c X^T y."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    lam, c = 0.5, 1.5
    eye = torch.eye(4, dtype=torch.float64)
    ridge = torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)
    torch.testing.assert_close(go_mtl.ridge_weights([x], [y], lam)[:, 0], ridge)
    codes = torch.tensor([[c]], dtype=torch.float64)
    expected = torch.linalg.solve(c**2 * x.T @ x + lam * eye, c * x.T @ y)
    torch.testing.assert_close(go_mtl.l_step([x], [y], codes, lam)[:, 0], expected)
    basis, codes, history = go_mtl.solve([x], [y], num_bases=1, mu=0.1, lam=lam, iterations=2)
    assert basis.shape == (4, 1) and codes.shape == (1, 1) and history[1] <= history[0] + 1e-9


def test_default_number_of_bases_is_four():
    """The docstring's default k = 4 latent basis tasks."""
    model = GOMTL(("a",), torch.nn.Identity(), 5, {"a": 2})
    assert model.basis.shape == (5, 4) and model.codes["a"].shape == (4, 2)
