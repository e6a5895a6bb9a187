"""DeepSaliency: a pooling FCN trunk shared by saliency and segmentation, deconvolution heads."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.encoders import ConvEncoder
from reference_impls.architectures.fcnn import DeepSaliency

TASKS = ("saliency", "seg")
OUT = {"saliency": 1, "seg": 4}


def make():
    torch.manual_seed(0)
    return DeepSaliency(TASKS, ConvEncoder(3, (5, 5), pool=True), OUT)


def test_whole_image_in_whole_maps_out(device):
    model = make().to(device)
    x = torch.randn(2, 3, 8, 12, device=device)
    assert model.encode(x).shape == (2, 5, 2, 3)  # the shared trunk pools by 4
    out = model(x)
    assert out["saliency"].shape == (2, 1, 8, 12) and out["seg"].shape == (2, 4, 8, 12)
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 6, 6, device=device))


def test_deconvolution_with_a_box_kernel_is_nearest_upsampling(device):
    model = make().to(device)
    branch = model.heads["saliency"]
    with torch.no_grad():
        branch.up.weight.zero_()
        branch.up.weight[:, :, 2:6, 2:6] = 1.0  # taps landing on the 4x4 block a coarse cell covers
        branch.up.bias.zero_()
    z = torch.randn(1, 5, 2, 3, device=device)
    coarse = branch.convs(z)
    torch.testing.assert_close(branch(z), coarse.repeat_interleave(4, -2).repeat_interleave(4, -1))


def test_branch_by_hand(device):
    """3x3 conv + ReLU, 1x1 scores, then a stride-4 transposed conv of kernel 8 and padding 2."""
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    z = model.trunk(x)
    for t in TASKS:
        conv, _, score = model.heads[t].convs
        up = model.heads[t].up
        hidden = F.conv2d(z, conv.weight, conv.bias, padding=1).clamp(min=0)
        coarse = F.conv2d(hidden, score.weight, score.bias)
        expected = F.conv_transpose2d(coarse, up.weight, up.bias, stride=4, padding=2)
        torch.testing.assert_close(model(x)[t], expected, atol=1e-5, rtol=1e-4)


def test_a_trunk_that_does_not_pool_is_refused():
    """Deconvolution heads undo the trunk's pooling; without pooling they have nothing to undo."""
    with pytest.raises(ValueError, match="pool"):
        DeepSaliency(TASKS, ConvEncoder(3, (5,)), OUT)


def test_both_losses_train_the_trunk_each_head_only_its_own(device, params_with_grad):
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    trunk = {f"trunk.{n}" for n, _ in model.trunk.named_parameters()}
    for t in TASKS:
        got = params_with_grad(model, model(x)[t].square().mean())
        assert trunk <= got
        assert {n.split(".")[1] for n in got if n.startswith("heads")} == {t}


def test_equals_shared_bottom_with_the_same_modules(device):
    from reference_impls.architectures.shared_bottom import SharedBottom

    model = make().to(device)
    baseline = SharedBottom(TASKS, model.trunk, model.heads).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    for t, y in model(x).items():
        torch.testing.assert_close(y, baseline(x)[t])


def test_parameter_count():
    c, f = 5, 4
    trunk = (3 * c * 9 + c) + (c * c * 9 + c)
    branch = lambda o: (c * c * 9 + c) + (c * o + o) + (o * o * (2 * f) ** 2 + o)  # noqa: E731
    model = make()
    assert sum(p.numel() for p in model.shared_parameters()) == trunk
    for t, o in OUT.items():
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == branch(o)


def test_registry_shapes_training_and_vector_rejection(device, registry_output_shapes, short_training):
    registry_output_shapes("fcnn", device)
    for dense in (True, False):
        first, last = short_training("fcnn", dense, device, steps=15)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError):
        registry.build("fcnn", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_from_problem_refuses_an_odd_height_as_well_as_an_odd_width():
    for shape in ((3, 7, 8), (3, 8, 7)):
        with pytest.raises(ValueError, match="multiples"):
            registry.build("fcnn", registry.Problem(TASKS, shape, OUT, dense=True))
