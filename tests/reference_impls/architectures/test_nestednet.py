"""NestedNet: nested masks, the core level uses only core weights, levels share one trunk."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.nestednet import NestedNet, level_widths
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("coarse", "mid", "fine"), (6,), {"coarse": 2, "mid": 3, "fine": 1})


def test_level_widths():
    assert level_widths(12, 3) == [4, 8, 12]
    assert level_widths(10, 3) == [3, 7, 10]  # 10/3 and 20/3 rounded to the nearest channel count
    assert level_widths(3, 3) == [1, 2, 3]  # one channel is enough for the core level
    with pytest.raises(ValueError):
        level_widths(2, 3)
    with pytest.raises(ValueError):
        level_widths(0, 1)  # a level needs at least one channel


def test_levels_must_widen_strictly():
    """c_1 < ... < c_n: widths out of order or repeated are refused, one level per task."""
    model = build("nestednet", VEC, width=12)
    for widths in ((8, 4, 12), (4, 4, 12), (4, 12)):
        with pytest.raises(ValueError):
            NestedNet(VEC.tasks, list(model.blocks), widths, model.heads)


def test_masks_are_nested_and_the_top_level_is_dense():
    model = build("nestednet", VEC, width=12)
    masks = [model.weight_masks(level) for level in range(3)]
    for layer in range(2):
        m1, m2, m3 = (m[layer] for m in masks)
        assert not (m1 & ~m2).any() and not (m2 & ~m3).any()  # M_1 <= M_2 <= M_3
        assert (m1 != m2).any() and m3.all()
    assert [m[0].sum().item() for m in masks] == [4 * 6, 8 * 6, 12 * 6]  # first layer: every input
    assert [m[1].sum().item() for m in masks] == [4 * 4, 8 * 8, 12 * 12]


def test_core_level_uses_only_core_weights(device, params_with_grad):
    torch.manual_seed(0)
    model = build("nestednet", VEC, width=12).to(device)
    x = torch.randn(5, 6, device=device)
    touched = params_with_grad(model, model(x)["coarse"].square().sum())
    core = model.weight_masks(0)
    for block, mask in zip(model.blocks, core):
        grad = block[0].weight.grad
        assert grad[~mask.to(device)].abs().sum() == 0 and grad[mask.to(device)].abs().sum() > 0
    assert not any(n.startswith(("heads.mid", "heads.fine")) for n in touched)
    before = model(x)
    with torch.no_grad():
        for block, mask in zip(model.blocks, core):
            block[0].weight[~mask.to(device)] += 5.0
    after = model(x)
    torch.testing.assert_close(after["coarse"], before["coarse"])
    assert not torch.allclose(after["mid"], before["mid"])


def test_core_level_is_the_narrow_network_inside(device):
    torch.manual_seed(0)
    model = build("nestednet", VEC, width=12).to(device)
    x = torch.randn(4, 6, device=device)
    (l0, l1) = (model.blocks[0][0], model.blocks[1][0])
    h = torch.relu(F.linear(x, l0.weight[:4], l0.bias[:4]))
    h = torch.relu(F.linear(h, l1.weight[:4, :4], l1.bias[:4]))
    torch.testing.assert_close(model(x)["coarse"], model.heads["coarse"](h))


def test_top_level_is_the_whole_trunk(device):
    torch.manual_seed(0)
    model = build("nestednet", VEC, width=12).to(device)
    x = torch.randn(4, 6, device=device)
    torch.testing.assert_close(model(x)["fine"], model.heads["fine"](torch.nn.Sequential(*model.blocks)(x)))


def test_n_in_1_parameter_count(n_params):
    model = build("nestednet", VEC, width=12)
    assert isinstance(model, NestedNet)
    trunk = (6 * 12 + 12) + (12 * 12 + 12)  # one trunk, whatever the number of levels
    heads = (4 * 2 + 2) + (8 * 3 + 3) + (12 * 1 + 1)
    assert n_params(model) == trunk + heads


def test_registry_build_and_short_training(device, short_training, registry_output_shapes):
    registry_output_shapes("nestednet", device)
    for dense in (True, False):
        first, last = short_training("nestednet", dense, device, 15)
        assert last < 0.8 * first


def test_task_specific_parameters_are_the_head_only(split_by_task):
    """Levels share the trunk tensors; a task claims its head, and its output reaches no other head."""
    torch.manual_seed(0)
    model = build("nestednet", VEC, width=12)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"heads.{t}.0.weight", f"heads.{t}.0.bias"}
        assert reached == own | trunk


def test_from_problem_depth_sets_the_number_of_nested_layers():
    """``depth`` equal-width trunk layers, each masked per level."""
    model = NestedNet.from_problem(VEC, width=6, depth=3)
    assert len(model.blocks) == 3 and len(model.weight_masks(0)) == 3
