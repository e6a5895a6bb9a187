import copy

import torch

from reference_impls.architectures.cross_stitch import CrossStitch, stitch_init
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})
IMG = Problem(("a", "b"), (2, 6, 6), {"a": 3, "b": 1}, dense=True)


def test_identity_units_equal_independent_networks(device):
    for problem in (VEC, IMG):
        torch.manual_seed(1)
        model = build("cross_stitch", problem, width=8).to(device)
        with torch.no_grad():
            for alpha in model.stitches:
                alpha.copy_(torch.eye(len(problem.tasks)))
        x = torch.randn(3, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            alone = torch.nn.Sequential(copy.deepcopy(model.columns[t]), copy.deepcopy(model.heads[t]))
            torch.testing.assert_close(out[t], alone(x))


def test_default_units_mix_columns(device, params_with_grad):
    torch.manual_seed(1)
    model = build("cross_stitch", VEC, width=8).to(device)
    loss = model(torch.randn(8, 5, device=device))["a"].sum()
    touched = params_with_grad(model, loss)
    assert any(n.startswith("columns.b") for n in touched)  # a reads column b through alpha_AB
    assert not any(n.startswith("heads.b") or n.startswith("heads.c") for n in touched)


def test_identity_units_isolate_gradients(device, params_with_grad):
    torch.manual_seed(1)
    model = build("cross_stitch", VEC, width=8, self_weight=1.0).to(device)
    loss = model(torch.randn(8, 5, device=device))["a"].sum()
    touched = params_with_grad(model, loss)
    assert not any(n.startswith(("columns.b", "columns.c")) for n in touched)
    assert any(n.startswith("stitches") for n in touched)  # alpha still learns to open up


def test_stitch_init_rows_sum_to_one():
    alpha = stitch_init(4, 0.7)
    torch.testing.assert_close(alpha.sum(1), torch.ones(4))
    assert torch.allclose(alpha.diagonal(), torch.full((4,), 0.7))


def test_one_task_is_its_plain_column(device):
    """With one task nothing is mixed: the unit is [[1]] whatever alpha_S, so the model is its column."""
    assert stitch_init(1, 0.9).tolist() == [[1.0]]
    torch.manual_seed(1)
    model = build("cross_stitch", Problem(("a",), (5,), {"a": 2}), width=8, self_weight=0.9).to(device)
    x = torch.randn(3, 5, device=device)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](model.columns["a"](x)))


def test_parameter_count(n_params):
    T, d, w = 3, 5, 8
    model = build("cross_stitch", VEC, width=w, depth=2)
    column = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == T * column + 2 * T * T + heads
    assert isinstance(model, CrossStitch)


def test_every_block_is_followed_by_eq_1_with_rows_as_outputs(device):
    """x~_t = sum_s alpha[t, s] x_s after each block, with a non-symmetric alpha per block."""
    torch.manual_seed(1)
    model = build("cross_stitch", IMG, width=8).to(device)
    with torch.no_grad():
        for j, alpha in enumerate(model.stitches):
            alpha.copy_(torch.tensor([[0.7, 0.3 + j], [-0.2, 1.1]]))
    x = torch.randn(2, *IMG.input_shape, device=device)
    fa, fb = x, x
    for j, alpha in enumerate(model.stitches):
        ha, hb = model.columns["a"].blocks[j](fa), model.columns["b"].blocks[j](fb)
        fa, fb = alpha[0, 0] * ha + alpha[0, 1] * hb, alpha[1, 0] * ha + alpha[1, 1] * hb
    out = model(x)
    torch.testing.assert_close(out["a"], model.heads["a"](fa))
    torch.testing.assert_close(out["b"], model.heads["b"](fb))


def test_default_units_start_at_alpha_s_0_9():
    """Default init: alpha_S = 0.9 on the diagonal, the other 0.1 of each row split evenly."""
    two = build("cross_stitch", IMG, width=8)
    for alpha in two.stitches:
        torch.testing.assert_close(alpha.detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = build("cross_stitch", VEC, width=8)
    expected = torch.full((3, 3), 0.05) + 0.85 * torch.eye(3)
    for alpha in three.stitches:
        torch.testing.assert_close(alpha.detach(), expected)


def test_only_heads_are_task_specific_with_default_units(device, split_by_task):
    """Default units mix every column into every task, so a task owns exactly its head."""
    torch.manual_seed(1)
    model = build("cross_stitch", VEC, width=8).to(device)
    split = split_by_task(model, torch.randn(6, 5, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"heads.{t}."))
