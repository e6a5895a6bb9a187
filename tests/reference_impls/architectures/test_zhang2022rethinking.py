"""Separate-bottom sharing: parameter counts by formula, k = 0 is shared-bottom, k = depth is independent."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom
from reference_impls.architectures.zhang2022rethinking import SeparateBottom

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 6, 6), {"a": 3, "b": 1}, dense=True)


def count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("k", (0, 1, 2, 3))
def test_parameter_counts_follow_the_layer_formula(k):
    d_in, w, depth = 12, 8, 3
    model = build("zhang2022rethinking", VEC, width=w, depth=depth, separate_bottom=k)
    widths = [d_in] + [w] * depth
    layer = [widths[i] * widths[i + 1] + widths[i + 1] for i in range(depth)]  # weights + biases
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert count(model.task_specific_parameters(t)) == sum(layer[:k]) + heads[t]
    assert count(model.shared_parameters()) == sum(layer[k:])
    assert count(model.parameters()) == 2 * sum(layer[:k]) + sum(layer[k:]) + sum(heads.values())


def test_conv_counts_and_first_layer_is_domain_specific(device, params_with_grad):
    c, w = 2, 4
    model = build("zhang2022rethinking", IMG, width=w, depth=2, separate_bottom=1).to(device)
    assert count(model.bottom["a"].parameters()) == 9 * c * w + w  # one 3x3 conv per domain
    assert count(model.shared_parameters()) == 9 * w * w + w
    x = torch.randn(2, 2, 6, 6, device=device)
    touched = params_with_grad(model, model(x)["b"].square().sum())
    assert touched == {"bottom.b.0.0.weight", "bottom.b.0.0.bias", "top.0.0.weight", "top.0.0.bias",
                       "heads.b.0.weight", "heads.b.0.bias"}


def test_by_default_each_domain_owns_its_first_block_and_head(split_by_task):
    """Built with no ``separate_bottom``: one domain-specific block (k = 1), the other blocks shared."""
    torch.manual_seed(0)
    model = build("zhang2022rethinking", VEC, width=8, depth=3)
    split = split_by_task(model, torch.randn(4, 12))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"bottom.{t}.", f"heads.{t}."))
    assert {n.split(".")[2] for n in names_under(model, "bottom.")} == {"0"}
    assert {n.split(".")[1] for n in names_under(model, "top.")} == {"0", "1"}


def test_no_separate_layer_is_shared_bottom(device):
    torch.manual_seed(0)
    model = build("zhang2022rethinking", VEC, width=8, depth=2, separate_bottom=0).to(device)
    reference = SharedBottom(VEC.tasks, model.top, model.heads).to(device)
    x = torch.randn(5, 12, device=device)
    out, expected = model(x), reference(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], expected[t])
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in reference.shared_parameters()}


def test_all_layers_separate_is_independent_models(device, params_with_grad):
    torch.manual_seed(0)
    model = build("zhang2022rethinking", VEC, width=8, depth=2, separate_bottom=2).to(device)
    assert model.shared_parameters() == []
    x = torch.randn(5, 12, device=device)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](model.bottom["a"](x)))
    assert not torch.allclose(model.bottom["a"](x), model.bottom["b"](x))  # independently initialised
    touched = params_with_grad(model, model(x)["a"].sum())
    assert all(n.startswith(("bottom.a.", "heads.a.")) for n in touched)
    with pytest.raises(ValueError):
        build("zhang2022rethinking", VEC, width=8, depth=2, separate_bottom=3)
    assert type(model) is SeparateBottom


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("zhang2022rethinking", device)
    first, last = short_training("zhang2022rethinking", dense, device, steps=30)
    assert last < 0.8 * first


@pytest.mark.parametrize("k", (0, 1, 2))
def test_a_single_domain_is_its_own_trunk_then_its_head(k):
    """With one domain there is nothing to share: the model is that domain's trunk, split anywhere."""
    from reference_impls.architectures.encoders import heads_for, trunk_for

    problem = Problem(("a",), (12,), {"a": 2})
    torch.manual_seed(0)
    trunk, heads = trunk_for((12,), 8, 2), heads_for(problem, 8)
    model = SeparateBottom(("a",), {"a": trunk}, heads, separate_bottom=k)
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x)["a"], heads["a"](trunk(x)))
