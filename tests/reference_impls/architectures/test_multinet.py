"""MultiNet: one encoder trained by every task's loss; classification, detection, FCN decoders."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.encoders import ConvEncoder
from reference_impls.architectures.multinet import MultiNet

TASKS = ("road", "cars", "scene")
OUT = {"road": 2, "cars": 6, "scene": 3}


def make():
    torch.manual_seed(0)
    seg = MultiNet(TASKS, ConvEncoder(3, (5, 5, 5), pool=True), OUT, dense=True, detection_tasks={"cars"})
    torch.manual_seed(0)
    cls = MultiNet(TASKS, ConvEncoder(3, (5, 5, 5), pool=True), OUT, dense=False, detection_tasks={"cars"})
    seg.decoders["scene"] = cls.decoders["scene"]  # one model with all three decoder kinds
    seg.kinds["scene"] = "classification"
    return seg


def encoder_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])


def test_three_decoder_kinds_and_their_shapes(device):
    model = make().to(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    assert out["road"].shape == (2, 2, 16, 16)  # segmentation at input resolution
    assert out["cars"].shape == (2, 6, 2, 2)  # one confidence+box vector per cell, stride 8
    assert out["scene"].shape == (2, 3)  # one score vector per image


def test_encoder_gradient_is_the_sum_of_every_tasks_gradient(device, params_with_grad):
    model = make().to(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    losses = {t: o.square().mean() for t, o in out.items()}
    per_task = {t: encoder_grad(model, l) for t, l in losses.items()}
    joint = encoder_grad(model, sum(losses.values()))
    torch.testing.assert_close(joint, sum(per_task.values()))
    encoder_names = {f"encoder.{n}" for n, _ in model.encoder.named_parameters()}
    for t in TASKS:
        assert per_task[t].abs().sum() > 0, t
        got = params_with_grad(model, model(torch.randn(2, 3, 16, 16, device=device))[t].square().mean())
        assert encoder_names <= got, t  # every encoder weight learns from every task
        assert {n.split(".")[1] for n in got if n.startswith("decoders")} == {t}  # own decoder only
        own = {f"decoders.{t}.{n}" for n, _ in model.decoders[t].named_parameters()}
        assert own <= got, own - got  # every layer of the decoder, skip scores included, learns


def test_segmentation_decoder_is_fcn_with_skips_by_hand(device):
    model = make().to(device)
    x = torch.randn(1, 3, 16, 16, device=device)
    f1, f2, f3 = model.features(x)
    dec = model.decoders["road"]
    s = dec.ups[2](dec.scores[2](f3), output_size=(4, 4)) + dec.scores[1](f2)
    s = dec.ups[1](s, output_size=(8, 8)) + dec.scores[0](f1)
    torch.testing.assert_close(model(x)["road"], dec.ups[0](s, output_size=(16, 16)))


def test_classification_and_detection_decoders_by_hand(device):
    """Bottleneck with ReLU on the last features; average over space (cls) or per cell (det)."""
    model = make().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    last = model.features(x)[-1]
    out = model(x)
    for t in ("scene", "cars"):
        dec = model.decoders[t]
        conv = dec.bottleneck[0]
        hidden = (torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], last)
                  + conv.bias.view(1, -1, 1, 1)).clamp(min=0)
        if t == "scene":
            expected = hidden.mean(dim=(2, 3)) @ dec.fc.weight.T + dec.fc.bias
        else:
            w = dec.predict.weight[:, :, 0, 0]
            expected = torch.einsum("oc,bchw->bohw", w, hidden) + dec.predict.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-4)


def test_detection_cells_see_only_their_receptive_field(device):
    model = make().to(device)
    x = torch.randn(1, 3, 16, 16, device=device, requires_grad=True)
    model(x)["cars"][0, :, 0, 0].sum().backward()  # top-left cell
    # receptive field of a stride-8 cell after three 3x3 conv + pool blocks: pixels 0..14
    assert x.grad[..., 15:, :].abs().sum() == 0 and x.grad[..., :, 15:].abs().sum() == 0
    assert x.grad[..., :8, :8].abs().sum() > 0


def test_parameter_count():
    c, b, D = 5, 8, 3
    encoder = (3 * c * 9 + c) + 2 * (c * c * 9 + c)
    seg = lambda o: D * (c * o + o) + D * (o * o * 16 + o)  # noqa: E731
    det = lambda o: (c * b + b) + (b * o + o)  # noqa: E731
    cls = lambda o: (c * b + b) + (b * o + o)  # noqa: E731
    model = make()
    assert sum(p.numel() for p in model.shared_parameters()) == encoder
    assert sum(p.numel() for p in model.task_specific_parameters("road")) == seg(2)
    assert sum(p.numel() for p in model.task_specific_parameters("cars")) == det(6)
    assert sum(p.numel() for p in model.task_specific_parameters("scene")) == cls(3)


def test_registry_shapes_training_and_vector_rejection(device, registry_output_shapes, short_training):
    registry_output_shapes("multinet", device)
    for dense in (True, False):
        first, last = short_training("multinet", dense, device, steps=15)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError):
        registry.build("multinet", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_an_encoder_that_does_not_pool_is_refused():
    """The FCN decoder upsamples by 2 per encoder block, so the encoder must pool."""
    with pytest.raises(ValueError, match="pool"):
        MultiNet(TASKS, ConvEncoder(3, (5, 5), pool=False), OUT, dense=True)


def test_from_problem_passes_detection_tasks_and_bottleneck_through():
    """Options of the constructor reach it from a problem: a named detection task gets the detection
    decoder with the requested bottleneck."""
    problem = registry.Problem(("road", "cars"), (3, 8, 8), {"road": 2, "cars": 6}, dense=True)
    model = registry.build("multinet", problem, width=4, detection_tasks={"cars"}, bottleneck=3)
    assert model.kinds == {"road": "segmentation", "cars": "detection"}
    assert type(model.decoders["cars"]).__name__ == "DetectionDecoder"
    assert any(p.shape[0] == 3 for p in model.decoders["cars"].parameters())


def test_kinds_name_each_tasks_decoder_on_an_image_level_problem():
    """Without dense outputs, every task not named for detection gets the classification decoder."""
    model = MultiNet(TASKS, ConvEncoder(3, (5, 5), pool=True), OUT, dense=False, detection_tasks={"cars"})
    assert model.kinds == {"road": "classification", "cars": "detection", "scene": "classification"}
    assert {t: type(d).__name__ for t, d in model.decoders.items()} == {
        "road": "ClassificationDecoder", "cars": "DetectionDecoder", "scene": "ClassificationDecoder"}
