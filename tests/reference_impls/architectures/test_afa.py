"""AFA: CAM weights are per channel, SAM weights per pixel, both convex over tasks in (0,1)."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.afa import (
    AdaptiveFeatureAggregation,
    ChannelAggregation,
    SpatialAggregation,
)

TASKS = ("a", "b", "c")
OUT = {"a": 2, "b": 1, "c": 1}
H, W, C = 5, 6, 4


def feats(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(2, C, H, W, generator=g).to(device) for t in TASKS}


def make_model():
    torch.manual_seed(0)
    return AdaptiveFeatureAggregation(TASKS, 3, OUT, image_size=(H, W), channels=C, depth=2)


@pytest.mark.parametrize("module_cls", ["cam", "sam"])
def test_attention_lies_in_unit_interval_and_sums_to_one_over_tasks(device, module_cls):
    torch.manual_seed(0)
    module = (ChannelAggregation(TASKS, C) if module_cls == "cam" else SpatialAggregation(TASKS, H, W)).to(device)
    f = feats(device)
    for t, w in module.weights(f).items():
        assert torch.all((w > 0) & (w < 1))
        torch.testing.assert_close(w.sum(dim=1), torch.ones_like(w.sum(dim=1)))
        stacked = torch.stack([f[s] for s in TASKS], dim=1)
        torch.testing.assert_close(module(f)[t], (w * stacked).sum(dim=1))


def test_cam_weights_are_channel_wise_and_sam_weights_spatial(device):
    torch.manual_seed(0)
    cam, sam = ChannelAggregation(TASKS, C).to(device), SpatialAggregation(TASKS, H, W).to(device)
    f = feats(device)
    assert cam.weights(f)["a"].shape == (2, len(TASKS), C, 1, 1)
    assert sam.weights(f)["a"].shape == (2, len(TASKS), 1, H, W)
    # CAM only sees pooled statistics: shuffling pixels (same way in every task) commutes with it.
    perm = torch.randperm(H * W)
    shuffle = lambda x: x.flatten(2)[:, :, perm].view_as(x)  # noqa: E731
    out, out_shuffled = cam(f), cam({t: shuffle(v) for t, v in f.items()})
    for t in TASKS:
        torch.testing.assert_close(out_shuffled[t], shuffle(out[t]))
    # SAM only sees channel means: permuting channels (same way in every task) commutes with it.
    cperm = torch.randperm(C)
    out, out_perm = sam(f), sam({t: v[:, cperm] for t, v in f.items()})
    for t in TASKS:
        torch.testing.assert_close(out_perm[t], out[t][:, cperm])


def test_identical_inputs_pass_through_unchanged(device):
    torch.manual_seed(0)
    x = torch.randn(2, C, H, W, device=device)
    same = {t: x for t in TASKS}
    for module in (ChannelAggregation(TASKS, C).to(device), SpatialAggregation(TASKS, H, W).to(device)):
        for out in module(same).values():
            torch.testing.assert_close(out, x)


def test_aggregation_weights_depend_on_the_input(device):
    torch.manual_seed(0)
    cam = ChannelAggregation(TASKS, C).to(device)
    assert not torch.allclose(cam.weights(feats(device, 0))["a"], cam.weights(feats(device, 1))["a"])


def test_sam_rejects_other_spatial_size(device):
    sam = SpatialAggregation(TASKS, H, W).to(device)
    with pytest.raises(ValueError):
        sam({t: torch.randn(1, C, H + 1, W, device=device) for t in TASKS})


def test_task_a_loss_reaches_all_columns_but_not_other_tasks_specific_parameters(device):
    model = make_model().to(device)
    model(torch.randn(2, 3, H, W, device=device))["a"].square().sum().backward()
    for t in TASKS:
        assert sum(p.grad.abs().sum() for p in model.columns[t][0].parameters()) > 0
    for t in ("b", "c"):
        assert all(p.grad is None for p in model.task_specific_parameters(t))
    # CAM's transform for target b still matters to task a: SAM mixes CAM's outputs again.
    assert model.afa_layers[0].cam.to_logits["b"].weight.grad.abs().sum() > 0


def test_parameter_count():
    K, hw = len(TASKS), H * W
    hidden = max(K * C // 4, 4)
    conv3 = lambda i, o: i * o * 9 + o  # noqa: E731
    cam = K * C * hidden + K * hidden * K * C
    sam = K * 49 + K * hw * K * hw
    columns = K * (conv3(3, C) + conv3(C, C))
    heads = sum(C * o + o for o in OUT.values())
    model = make_model()
    assert sum(p.numel() for p in model.parameters()) == columns + cam + sam + heads
    per_task = hw * K * hw + conv3(C, C) + C * 2 + 2
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == per_task


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("afa", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("afa", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_afa_layer_is_relu_of_sam_of_cam(device):
    torch.manual_seed(0)
    layer = make_model().afa_layers[0].to(device)
    f = {t: v - 0.5 for t, v in feats(device).items()}  # negatives: the ReLU must show
    expected = {t: torch.relu(v) for t, v in layer.sam(layer.cam(f)).items()}
    for t, out in layer(f).items():
        torch.testing.assert_close(out, expected[t])
        assert (out >= 0).all()


def spread_weights(module, scale=3.0):
    """Large random weights, so wrong pooling, a missing ReLU or a wrong layout moves the softmax."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g).to(p.device) / p.shape[-1] ** 0.5)


def softmax_over_sources(logits_of):
    """``logits_of(j)`` is source j's logits; softmax across j, stacked on dim 1."""
    return torch.softmax(torch.stack([logits_of(j) for j in range(len(TASKS))], dim=1), dim=1)


def test_cam_weights_by_hand(device):
    """a_k = softmax_j(W_k ReLU(W_r [mean_hw F_1, ..., mean_hw F_K])), logit (j, c) at j*C + c."""
    torch.manual_seed(0)
    cam = ChannelAggregation(TASKS, C).to(device)
    spread_weights(cam)
    f = feats(device)
    pooled = torch.cat([f[t].mean(dim=(2, 3)) for t in TASKS], dim=1)
    g = torch.relu(pooled @ cam.reduce.weight.T)
    assert (g == 0).any() and (g > 0).any()  # the ReLU is exercised
    got = cam.weights(f)
    for t in TASKS:
        logits = g @ cam.to_logits[t].weight.T  # (B, K*C)
        expected = softmax_over_sources(lambda j: logits[:, j * C:(j + 1) * C])
        torch.testing.assert_close(got[t], expected[..., None, None])
    assert not torch.allclose(got["a"], got["b"])  # each target has its own transform


def test_sam_weights_by_hand(device):
    """b_k = softmax_j(V_k ReLU(conv7x7([mean_c F_1, ..., mean_c F_K]))), logit (j, p) at j*HW + p."""
    torch.manual_seed(0)
    sam = SpatialAggregation(TASKS, H, W).to(device)
    spread_weights(sam)
    f = feats(device)
    maps = torch.stack([f[t].mean(dim=1) for t in TASKS], dim=1)  # (B, K, H, W)
    g = torch.relu(torch.nn.functional.conv2d(maps, sam.conv.weight, padding=3)).flatten(1)
    assert (g == 0).any() and (g > 0).any()
    got = sam.weights(f)
    for t in TASKS:
        logits = g @ sam.to_logits[t].weight.T  # (B, K*H*W)
        expected = softmax_over_sources(lambda j: logits[:, j * H * W:(j + 1) * H * W].view(-1, H, W))
        torch.testing.assert_close(got[t], expected[:, :, None])
    assert not torch.allclose(got["a"], got["b"])


def test_depth_3_alternates_column_blocks_with_their_own_afa_layers_by_hand(device):
    """Depth L has L - 1 AFA layers, layer i between blocks i and i + 1: at depth 3 the second
    aggregation uses afa_layers[1], not the first layer again (depth 2 cannot tell them apart)."""
    torch.manual_seed(0)
    model = AdaptiveFeatureAggregation(TASKS, 3, OUT, image_size=(H, W), channels=C, depth=3).to(device)
    assert len(model.afa_layers) == 2
    with torch.no_grad():  # large, different weights per layer: sharp softmaxes, so a swap shows
        for p in model.afa_layers.parameters():
            p.normal_(0.0, 3.0 / p.shape[-1] ** 0.5)
    x = torch.randn(2, 3, H, W, device=device)
    f = {t: x for t in TASKS}
    for depth in range(3):
        f = {t: model.columns[t][depth](v) for t, v in f.items()}
        if depth < 2:
            f = model.afa_layers[depth](f)
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](f[t]))


def test_every_afa_layer_trains_at_depth_3(device, params_with_grad):
    """Both AFA layers of a depth-3 model sit on the path to every task's output."""
    torch.manual_seed(0)
    model = AdaptiveFeatureAggregation(TASKS, 3, OUT, image_size=(H, W), channels=C, depth=3).to(device)
    x = torch.randn(2, 3, H, W, device=device)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    for i in range(2):
        assert any(n.startswith(f"afa_layers.{i}.cam.") for n in touched), i
        assert f"afa_layers.{i}.sam.to_logits.a.weight" in touched, i


def test_cam_hidden_width_is_k_c_over_4_but_at_least_4():
    """The docstring's CAM sizes: reduction 4 and at least 4 hidden units (the code's 16 and 32)."""
    for channels, hidden in ((16, 3 * 16 // 4), (2, 4)):
        cam = ChannelAggregation(TASKS, channels)
        assert cam.reduce.in_features == len(TASKS) * channels
        assert cam.reduce.out_features == hidden, channels
        assert all(lin.in_features == hidden for lin in cam.to_logits.values())


def test_registry_width_and_options_reach_the_model():
    """``width`` sets the column channels and other options (here depth) pass on to the constructor."""
    problem = registry.Problem(("a", "b"), (3, 6, 6), {"a": 2, "b": 1}, dense=True)
    torch.manual_seed(0)
    model = registry.build("afa", problem, width=8, depth=3)
    assert len(model.afa_layers) == 2
    assert [block[0].out_channels for block in model.columns["a"]] == [8, 8, 8]
    assert model(torch.randn(1, 3, 6, 6))["a"].shape == (1, 2, 6, 6)


def test_at_depth_3_each_task_owns_exactly_the_last_sam_transform_block_and_head(split_by_task):
    """Only what follows the last AFA layer is a task's own; earlier blocks are mixed into every task."""
    from .conftest import assert_each_task_owns_exactly, names_under

    torch.manual_seed(0)
    model = AdaptiveFeatureAggregation(TASKS, 3, OUT, image_size=(H, W), channels=C, depth=3)
    split = split_by_task(model, torch.randn(2, 3, H, W))
    assert_each_task_owns_exactly(split, lambda t: names_under(
        model, f"afa_layers.1.sam.to_logits.{t}.", f"columns.{t}.2.", f"heads.{t}."))
