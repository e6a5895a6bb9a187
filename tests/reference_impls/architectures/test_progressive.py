"""Progressive nets: Eq. (2) adapters, laterals only from earlier columns, frozen old columns."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.progressive import ProgressiveNet
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})
IMG = Problem(("a", "b", "c"), (2, 5, 5), {"a": 2, "b": 1, "c": 1}, dense=True)


def perturbed(model, column):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.columns[column].parameters():
            p.add_(0.5)
    return other


def test_column_k_depends_only_on_columns_up_to_k(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("progressive_nets", problem, width=6, depth=3, alpha_init=1.0).to(device)
        x = torch.randn(4, *problem.input_shape, device=device)
        out = model(x)
        for j in range(3):
            changed = perturbed(model, j)(x)
            for k, t in enumerate(problem.tasks):
                assert torch.equal(changed[t], out[t]) == (j > k), (j, t)


def test_adapter_follows_eq_2(device):
    torch.manual_seed(0)
    model = build("progressive_nets", VEC, width=4, depth=2, alpha_init=0.7).to(device)
    x = torch.randn(3, 5, device=device)
    h1 = [torch.relu(col.layers[0](x)) for col in model.columns]
    adapter = model.columns[2].adapters[0]
    lateral = torch.cat(h1[:2], dim=1) * adapter.alpha
    lateral = torch.relu(lateral @ adapter.project.weight.T) @ adapter.lateral.weight.T  # U f(V alpha h^(<k))
    h2 = torch.relu(model.columns[2].layers[1](h1[2]) + lateral)
    torch.testing.assert_close(model(x)["c"], model.heads["c"](h2))
    assert adapter.project.weight.shape == (4, 2 * 4)  # V reads both earlier columns


def test_on_images_v_is_a_1x1_convolution_and_u_a_3x3_one_like_w():
    torch.manual_seed(0)
    model = build("progressive_nets", IMG, width=4, depth=2, alpha_init=0.7).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    h1 = [torch.relu(F.conv2d(x, col.layers[0].weight, col.layers[0].bias, padding=1)) for col in model.columns]
    adapter, top = model.columns[2].adapters[0], model.columns[2].layers[1]
    v = F.conv2d(adapter.alpha * torch.cat(h1[:2], dim=1), adapter.project.weight[:, :, None, None])
    lateral = F.conv2d(torch.relu(v), adapter.lateral.weight, padding=1)
    h2 = torch.relu(F.conv2d(h1[2], top.weight, top.bias, padding=1) + lateral)
    torch.testing.assert_close(model(x)["c"], model.heads["c"](h2))


def test_zero_alpha_gives_independent_networks(device):
    torch.manual_seed(0)
    model = build("progressive_nets", VEC, width=6, depth=3, alpha_init=0.0).to(device)
    x = torch.randn(4, 5, device=device)
    for col, t in zip(model.columns, VEC.tasks):
        h = x
        for layer in col.layers:
            h = torch.relu(layer(h))
        torch.testing.assert_close(model(x)[t], model.heads[t](h))


def test_a_tasks_loss_never_reaches_earlier_columns(device, params_with_grad):
    torch.manual_seed(0)
    model = build("progressive_nets", VEC, width=6, depth=3, alpha_init=1.0).to(device)
    x = torch.randn(8, 5, device=device)
    touched = params_with_grad(model, model(x)["c"].square().sum())
    assert all(n.startswith(("columns.2.", "heads.c.")) for n in touched)
    assert {"columns.2.adapters.0.alpha", "columns.2.adapters.1.project.weight"} <= touched
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert all(n.startswith(("columns.0.", "heads.a.")) for n in touched)


def test_task_specific_parameters_affect_only_their_task(device):
    torch.manual_seed(0)
    model = build("progressive_nets", VEC, width=6, depth=3, alpha_init=1.0).to(device)
    x = torch.randn(4, 5, device=device)
    out = model(x)
    for t in VEC.tasks:
        other = copy.deepcopy(model)
        specific = {id(p) for p in model.task_specific_parameters(t)}
        with torch.no_grad():
            for p, q in zip(model.parameters(), other.parameters()):
                if id(p) in specific:
                    q.add_(0.5)
        changed = other(x)
        assert [not torch.equal(changed[s], out[s]) for s in VEC.tasks] == [s == t for s in VEC.tasks]


def tasks_each_parameter_changes(model, x):
    """``{parameter name: tasks whose output changes when only that parameter moves}``."""
    out = model(x)
    changes = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.5)
            moved = model(x)
            p.sub_(0.5)
            changes[name] = {t for t in model.tasks if not torch.allclose(moved[t], out[t], rtol=0, atol=1e-12)}
    return changes


def test_a_task_claims_every_parameter_only_its_output_reads():
    # The claim is maximal: column k's top layer and last adapter (and, for the last column, all of
    # it) change task k's output and no other, while everything else changes a later column too.
    torch.manual_seed(0)
    model = build("progressive_nets", VEC, width=6, depth=3, alpha_init=1.0).double()
    changes = tasks_each_parameter_changes(model, torch.randn(4, 5, dtype=torch.float64))
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        claimed = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert claimed == {n for n, tasks in changes.items() if tasks == {t}}, t
    assert "columns.1.adapters.1.alpha" in {names[id(p)] for p in model.task_specific_parameters("b")}
    assert {n for n, tasks in changes.items() if len(tasks) > 1} == {
        f"columns.{k}.layers.{i}.{w}" for k in (0, 1) for i in (0, 1) for w in ("weight", "bias")
    } | {f"columns.1.adapters.0.{n}" for n in ("alpha", "project.weight", "lateral.weight")}


def test_parameter_count_grows_quadratically(n_params):
    d, w, L = 5, 6, 3
    model = build("progressive_nets", VEC, width=w, depth=L)
    column = (d * w + w) + (L - 1) * (w * w + w)
    # Columns 1 and 2 (0-based) have an adapter per layer from layer 2: alpha, V (k*w -> w), U.
    adapters = sum((L - 1) * (1 + k * w * w + w * w) for k in range(1, 3))
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == 3 * column + adapters + heads
    assert isinstance(model, ProgressiveNet)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("progressive_nets", device)
    first, last = short_training("progressive_nets", dense, device, steps=15)
    assert last < 0.7 * first


def test_only_the_column_layers_have_biases_and_alpha_starts_small():
    """Eq. (2): W has a bias, V and U none (so alpha = 0 switches the lateral paths off), on images as on
    vectors; the paper starts alpha at a small value, and the default is small too."""
    for problem in (VEC, IMG):
        model = build("progressive_nets", problem, width=4, depth=2)
        for column in model.columns:
            assert all(layer.bias is not None for layer in column.layers)
            for adapter in column.adapters:
                assert adapter.lateral.bias is None and getattr(adapter.project, "bias", None) is None
                assert 0 < adapter.alpha.item() < 0.5


def test_an_input_that_is_neither_a_vector_nor_an_image_is_refused():
    with pytest.raises(ValueError, match="input shape"):
        build("progressive_nets", Problem(("a",), (2, 5), {"a": 1}))
