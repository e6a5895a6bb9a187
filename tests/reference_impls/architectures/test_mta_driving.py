"""MTA (Ishihara et al. 2021): CBAM gates by hand, one attention module by hand, the shape it
hands to the next stage, the paths' layout (dense tasks over every stage, image-level tasks on
the deepest one) and the chaining of each module's output into the next."""

import pytest
import torch

from reference_impls.architectures.mta_driving import ChannelGate, MTADriving, SpatialGate, TaskAttentionModule
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

DENSE = Problem(("seg", "depth"), (3, 8, 8), {"seg": 4, "depth": 1}, dense=True)
POOLED = Problem(("light", "steer"), (3, 8, 8), {"light": 4, "steer": 1})


def test_channel_gate_is_sigmoid_of_the_shared_mlp_on_avg_and_max_pooled_vectors():
    torch.manual_seed(0)
    gate = ChannelGate(8, reduction=4)
    x = torch.randn(2, 8, 5, 5)
    mlp = gate.mlp
    scores = mlp(x.mean(dim=(2, 3))) + mlp(x.flatten(2).max(dim=2).values)
    torch.testing.assert_close(gate(x), x * torch.sigmoid(scores).view(2, 8, 1, 1))
    assert mlp[0].out_features == 2  # 8 // 4


def test_spatial_gate_multiplies_by_the_sigmoid_of_a_conv_of_channel_max_and_mean():
    torch.manual_seed(1)
    gate = SpatialGate(kernel_size=3)
    x = torch.randn(2, 6, 5, 5)
    stacked = torch.stack([x.max(dim=1).values, x.mean(dim=1)], dim=1)
    mask = torch.sigmoid(torch.nn.functional.conv2d(stacked, gate.conv.weight, gate.conv.bias, padding=1))
    torch.testing.assert_close(gate.mask(x), mask)
    torch.testing.assert_close(gate(x), x * mask)
    assert 0 < mask.min() and mask.max() < 1


def test_one_module_by_hand_with_and_without_downsampling():
    torch.manual_seed(2)
    x, previous = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    last = TaskAttentionModule(4, 3, downsample=False, reduction=2).eval()
    cbam = last.spatial_gate(last.channel_gate(x))
    torch.testing.assert_close(last(x, previous), torch.relu(last.norm(cbam + previous + x)))
    inner = TaskAttentionModule(4, 7, downsample=True, reduction=2).eval()
    y = inner.conv(inner.spatial_gate(inner.channel_gate(x)) + x)
    expected = torch.relu(inner.norm(torch.nn.functional.avg_pool2d(y, 2) + torch.nn.functional.max_pool2d(y, 2)))
    out = inner(x)
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 8, 3, 3)  # the next stage's shape: twice the channels, half the side


def test_dense_tasks_get_a_path_over_every_stage_image_level_tasks_one_module():
    dense = MTADriving.from_problem(DENSE, width=4, num_stages=4)
    for t in DENSE.tasks:
        path = dense.paths[t]
        assert [m.spatial_gate.conv.kernel_size[0] for m in path] == [7, 7, 3, 3]
        assert [m.conv is not None for m in path] == [True, True, True, False]
    pooled = build("mta_driving", POOLED, width=4, num_stages=3)
    for t in POOLED.tasks:
        (module,) = pooled.paths[t]
        assert module.spatial_gate.conv.kernel_size[0] == 3 and module.conv is None
        assert module.norm.num_features == 16  # the deepest stage: 4 * 2**2 channels


def test_each_module_adds_the_previous_modules_output():
    torch.manual_seed(3)
    model = build("mta_driving", DENSE, width=4, num_stages=3).eval()
    x = torch.randn(2, 3, 8, 8)
    f = model.stage_outputs(x)
    path = model.paths["seg"]
    expected = path[2](f[2], path[1](f[1], path[0](f[0])))
    torch.testing.assert_close(model.attend("seg", f), expected)
    up = torch.nn.functional.interpolate(expected, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(x)["seg"], model.heads["seg"](up))
    pooled = build("mta_driving", POOLED, width=4, num_stages=3).eval()
    g = pooled.stage_outputs(x)
    torch.testing.assert_close(pooled(x)["light"], pooled.heads["light"](pooled.paths["light"][0](g[-1])))


def test_vector_inputs_and_images_too_small_for_the_stages_are_refused():
    with pytest.raises(ValueError, match="images"):
        build("mta_driving", Problem(("a",), (6,), {"a": 2}))
    with pytest.raises(ValueError, match="at least 8"):
        build("mta_driving", Problem(("a",), (3, 7, 9), {"a": 2}), num_stages=4)


def test_channel_gate_mlp_has_a_relu_between_its_two_layers():
    gate = ChannelGate(2, reduction=2).double()
    with torch.no_grad():  # one hidden unit: h = relu(v0 - v1), score_c = (c + 1) * h
        gate.mlp[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        gate.mlp[0].bias.zero_()
        gate.mlp[2].weight.copy_(torch.tensor([[1.0], [2.0]]))
        gate.mlp[2].bias.zero_()
    x = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    x[0, 1] = torch.tensor([1.0, 3.0])  # channel 0 all zero, channel 1 mean 2, max 3
    # v0 - v1 is -2 (avg) and -3 (max): the ReLU zeroes both, every score is 0, the gate is 1/2
    torch.testing.assert_close(gate(x), x / 2)


def test_reduction_defaults_to_16():
    model = build("mta_driving", DENSE, width=32, num_stages=2)
    assert [m.channel_gate.mlp[0].out_features for m in model.paths["seg"]] == [2, 4]  # 32 // 16, 64 // 16
    assert ChannelGate(64).mlp[0].out_features == 4
    assert TaskAttentionModule(48, 3, downsample=False).channel_gate.mlp[0].out_features == 3


def test_module_output_is_relu_after_batch_norm():
    torch.manual_seed(4)
    module = TaskAttentionModule(3, 3, downsample=False, reduction=1).double().eval()
    with torch.no_grad():  # a batch norm that is far from the identity: shifts and flips signs
        module.norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        module.norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        module.norm.weight.copy_(torch.tensor([-1.0, 2.0, 0.5]))
        module.norm.bias.copy_(torch.tensor([0.3, -0.2, 1.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = module.spatial_gate(module.channel_gate(x)) + x
    mean, var = module.norm.running_mean, module.norm.running_var + module.norm.eps
    w, b = module.norm.weight, module.norm.bias
    normed = (y - mean[:, None, None]) / var.sqrt()[:, None, None] * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(module(x), normed.clamp(min=0))


@pytest.mark.parametrize("problem", [DENSE, POOLED], ids=["dense", "pooled"])
def test_each_task_owns_exactly_its_attention_path_and_head(problem, split_by_task):
    torch.manual_seed(5)
    model = build("mta_driving", problem, width=4, num_stages=3, reduction=2)
    split = split_by_task(model, torch.randn(2, 3, 8, 8))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"paths.{t}.", f"heads.{t}."))


def test_channel_gate_keeps_one_hidden_unit_below_the_reduction():
    """The MLP's hidden width is max(1, C // reduction): 8, 16 and 32 channels with reduction 16
    give 1, 1 and 2 hidden units."""
    model = build("mta_driving", DENSE, width=8)
    for path in model.paths.values():
        for module, channels in zip(path, (8, 16, 32)):
            assert module.channel_gate.mlp[0].out_features == max(1, channels // 16)


def stages_and_heads(widths, in_channels=3):
    from reference_impls.architectures.encoders import conv_block
    stages = [conv_block(in_channels, widths[0])] + [conv_block(a, b, pool=True) for a, b in zip(widths, widths[1:])]
    return stages, {t: torch.nn.Identity() for t in POOLED.tasks}


def test_direct_construction_also_defaults_to_reduction_16():
    stages, heads = stages_and_heads([32, 64])
    model = MTADriving(POOLED.tasks, stages, [32, 64], heads, dense=False)
    assert model.paths["light"][0].channel_gate.mlp[0].out_features == 64 // 16


def test_stage_widths_that_do_not_double_or_do_not_match_the_stages_are_refused():
    """Each module's output must have the next stage's shape: widths double, one width per stage."""
    stages, heads = stages_and_heads([4, 8])
    for widths in ([4, 6], [4, 8, 16], [4]):  # not doubling (right length); doubling, wrong length
        with pytest.raises(ValueError, match="double"):
            MTADriving(POOLED.tasks, stages, widths, heads, dense=True)


def test_no_stages_a_zero_reduction_or_a_zero_width_are_refused():
    _, heads = stages_and_heads([4])
    with pytest.raises(ValueError, match="num_stages"):
        MTADriving(POOLED.tasks, [], [], heads, dense=True)
    stages, heads = stages_and_heads([4, 8])
    with pytest.raises(ValueError, match="reduction"):
        MTADriving(POOLED.tasks, stages, [4, 8], heads, dense=True, reduction=0)
    with pytest.raises(ValueError, match="width"):
        MTADriving.from_problem(DENSE, width=0)
