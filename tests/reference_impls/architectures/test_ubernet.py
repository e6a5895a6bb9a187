"""UberNet: pyramid through one trunk, skip layers at every depth, fusion, missing-label loss."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.encoders import ConvEncoder
from reference_impls.architectures.ubernet import UberNet, missing_label_loss

TASKS = ("edges", "seg")
OUT = {"edges": 1, "seg": 3}


def make(scales=(1.0, 0.5), **kw):
    torch.manual_seed(0)
    return UberNet(TASKS, ConvEncoder(3, (5, 5, 5)), OUT, scales=scales, hidden=4, **kw)


def mse_per_image(pred, target):
    return (pred - target).square().flatten(1).mean(dim=1)


def seg_by_hand(model, x):
    """The "seg" prediction: every scale through the trunk, skip layers, then the two fusions."""
    head = model.heads["seg"]
    per_scale = []
    for image in (x, F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)):
        feats, h = [], image
        for block in model.trunk.blocks:
            h = block(h)
            feats.append(head.skips[len(feats)](h))  # skip layer at the feature's own resolution
        fused = head.layer_fusion(torch.cat(feats, dim=1))
        per_scale.append(F.interpolate(fused, size=(8, 8), mode="bilinear", align_corners=False))
    return head.scale_fusion(torch.cat(per_scale, dim=1))


def test_forward_is_the_pyramid_fusion_computed_by_hand(device):
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(model(x)["seg"], seg_by_hand(model, x), atol=1e-5, rtol=1e-4)


def test_the_shared_trunk_learns_from_every_scale():
    # The same weights serve the full image and the half-size one, so the trunk's gradient is
    # the sum of both scales' contributions (that of the hand-written pyramid), none detached.
    model = make().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for pred in (model(x)["seg"], seg_by_hand(model, x)):
        grads.append(torch.autograd.grad(pred.square().sum(), list(model.trunk.parameters())))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


def test_one_output_per_image_is_the_pixel_mean_of_the_dense_prediction():
    x = torch.randn(2, 3, 8, 8)
    dense, pooled = make()(x), make(dense=False)(x)  # same seed, same weights
    for t in TASKS:
        torch.testing.assert_close(pooled[t], dense[t].mean(dim=(2, 3)))


def test_every_depth_and_scale_reaches_each_task(device):
    model = make().to(device)
    out = model(torch.randn(2, 3, 8, 8, device=device))
    out["edges"].square().sum().backward()
    head = model.heads["edges"]
    assert all(s.weight.grad.abs().sum() > 0 for s in head.skips)  # every depth
    w = head.scale_fusion.weight.grad  # (out, scales * out, 1, 1): both scales used
    assert w[:, :1].abs().sum() > 0 and w[:, 1:].abs().sum() > 0
    assert model.heads["seg"].layer_fusion.weight.grad is None


def test_one_scale_last_depth_only_is_shared_bottom_with_a_linear_head(device):
    model = make(scales=(1.0,)).to(device)
    head = model.heads["seg"]
    with torch.no_grad():
        for skip in head.skips[:-1]:
            skip.weight.zero_(), skip.bias.zero_()
    x = torch.randn(2, 3, 6, 6, device=device)
    hidden = model.heads["seg"].skips[-1](model.trunk(x))
    w = head.layer_fusion.weight[:, -4:]  # the last depth's slice of the fusion
    y = F.conv2d(hidden, w, head.layer_fusion.bias)
    torch.testing.assert_close(model(x)["seg"], head.scale_fusion(y), atol=1e-5, rtol=1e-4)


def test_missing_label_loss_by_hand(device, params_with_grad):
    model = make().to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    out = model(x)
    targets = {t: torch.randn_like(o) for t, o in out.items()}
    labelled = {"edges": torch.tensor([True, False, True, False]), "seg": torch.tensor([False] * 4)}
    targets["edges"][1] = float("nan")  # an unlabelled image's target is never read
    loss = missing_label_loss(out, targets, labelled, {t: mse_per_image for t in TASKS})
    e = mse_per_image(out["edges"], targets["edges"].nan_to_num())
    torch.testing.assert_close(loss, (e[0] + e[2]) / 2)
    got = params_with_grad(model, loss)
    assert any(n.startswith("heads.edges") for n in got) and any(n.startswith("trunk") for n in got)
    assert not any(n.startswith("heads.seg") for n in got)  # a task without labels trains nothing


def test_missing_label_loss_with_all_labels_is_the_usual_sum_of_means(device):
    out = {"a": torch.randn(3, 2, device=device), "b": torch.randn(3, 1, device=device)}
    targets = {t: torch.randn_like(o) for t, o in out.items()}
    labelled = {t: torch.ones(3, dtype=torch.bool) for t in out}
    loss = missing_label_loss(out, targets, labelled, {t: mse_per_image for t in out})
    expected = sum(F.mse_loss(out[t], targets[t]) for t in out)
    torch.testing.assert_close(loss, expected)


def test_missing_label_loss_uses_each_tasks_own_loss():
    out = {"edges": torch.tensor([[1.0], [3.0]]), "seg": torch.tensor([[2.0, 0.0], [-1.0, 1.0]])}
    targets = {"edges": torch.tensor([[0.0], [0.0]]), "seg": torch.tensor([[0.0, 0.0], [0.0, 0.0]])}
    labelled = {"edges": torch.tensor([True, True]), "seg": torch.tensor([False, True])}
    losses = {"edges": mse_per_image, "seg": lambda p, y: (p - y).abs().sum(dim=1)}
    # edges: squared errors 1 and 9, mean 5; seg: only image 1, |-1| + |1| = 2.
    assert missing_label_loss(out, targets, labelled, losses).item() == 7.0


def test_parameter_count():
    c, h, D, S = 5, 4, 3, 2
    trunk = (3 * c * 9 + c) + 2 * (c * c * 9 + c)
    per_task = {t: D * (c * h + h) + (D * h * o + o) + (S * o * o + o) for t, o in OUT.items()}
    model = make()
    assert sum(p.numel() for p in model.shared_parameters()) == trunk
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]


def test_registry_shapes_training_and_vector_rejection(device, registry_output_shapes, short_training):
    registry_output_shapes("ubernet", device)
    for dense in (True, False):
        first, last = short_training("ubernet", dense, device, steps=15)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError):
        registry.build("ubernet", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_trunks_that_downsample_or_change_width_are_refused():
    """Every depth's map is resized to the input and split by one channel count, so the trunk must keep
    the resolution and one width; either failing alone is refused."""
    with pytest.raises(ValueError, match="resolution-keeping"):
        UberNet(TASKS, ConvEncoder(3, (5, 5, 5), pool=True), OUT)
    with pytest.raises(ValueError, match="resolution-keeping"):
        UberNet(TASKS, ConvEncoder(3, (5, 6, 5)), OUT)


def test_from_problem_passes_options_on():
    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    model = registry.build("ubernet", problem, scales=(1.0, 0.5, 0.25), hidden=3)
    assert model.scales == (1.0, 0.5, 0.25) and model.heads["seg"].skips[0].out_channels == 3


def test_a_tiny_image_still_shrinks_to_one_pixel_at_a_small_scale():
    """A scale's image has max(1, round(n * s)) pixels per side: a 2 x 2 image at scale 0.5 is 1 x 1."""
    model = make(scales=(1.0, 0.5))
    seen = []
    model.trunk.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    model(torch.randn(1, 3, 2, 2))
    assert seen == [(2, 2), (1, 1)]
