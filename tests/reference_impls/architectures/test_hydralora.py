"""HydraLoRA: backbone at init, router is a distribution, update = Σ ω_i B_i A, shared adapters."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.hydralora import HydraLoRA
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise_heads(model, seed=0):
    """B_i start at 0; give them random values so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up:
                up.weight.copy_(torch.randn(up.weight.shape, generator=g).to(up.weight))


def test_untrained_model_is_the_backbone(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("hydralora", problem, width=6, rank=2, num_heads=3).to(device)
        layers = [torch.nn.Sequential(layer.base, torch.nn.ReLU()) for layer in model.layers]
        plain = SharedBottom(problem.tasks, copy.deepcopy(torch.nn.Sequential(*layers)), copy.deepcopy(model.heads))
        x = torch.randn(4, *problem.input_shape, device=device)
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], plain(x)[t], rtol=0, atol=0)


def test_router_weights_are_a_distribution_per_token_and_per_pixel(device):
    for problem, shape in ((VEC, (7, 4)), (IMG, (7, 4, 5, 5))):
        torch.manual_seed(0)
        model = build("hydralora", problem, width=6, num_heads=4).to(device)
        x = torch.randn(7, *problem.input_shape, device=device) * 3
        w = model.layers[0].route(x)
        assert w.shape == shape and (w > 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones_like(w.sum(1)))


@pytest.mark.parametrize("alpha, scale", ((3.0, 3.0 / 2), (None, 1.0)))  # default alpha = r: Eq. 3 unscaled
def test_update_equals_weighted_sum_of_heads_on_shared_a(device, alpha, scale):
    torch.manual_seed(0)
    model = build("hydralora", VEC, width=6, rank=2, num_heads=3, alpha=alpha).to(device)
    randomise_heads(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    a = layer.down.weight  # r x d_in, the one shared A
    omega = torch.softmax(x @ layer.router.weight.T, -1)  # ω = softmax(W_g^T x)
    update = sum(omega[:, i : i + 1] * (x @ (layer.up[i].weight @ a).T) for i in range(3))
    expected = x @ layer.base.weight.T + layer.base.bias + scale * update
    torch.testing.assert_close(layer(x), expected)


def test_fixed_routing_folds_into_one_matrix(device):
    """For one input, ω is fixed, so W0 + (α/r) Σ ω_i B_i A reproduces the layer (linear and conv, α/r = 2.5)."""
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("hydralora", problem, width=6, rank=2, num_heads=3, alpha=5.0).to(device)
        randomise_heads(model)
        layer = model.layers[0]
        x = torch.randn(1, *problem.input_shape, device=device)
        if problem is IMG:  # a 1x1 input: one output pixel, hence one routing vector
            x = x[..., 2:3, 2:3]
        omega = layer.route(x).flatten()
        w = layer.base.weight + layer.delta_weight(omega)
        merged = F.linear(x, w, layer.base.bias) if w.ndim == 2 else F.conv2d(x, w, layer.base.bias, padding=1)
        torch.testing.assert_close(layer(x), merged, rtol=1e-4, atol=1e-5)
        rank = torch.linalg.matrix_rank(layer.delta_weight(omega).flatten(1)).item()
        assert rank == 2  # still rank <= r, whatever the mixture


def test_conv_router_reads_the_patch_the_layer_reads(device):
    torch.manual_seed(0)
    layer = build("hydralora", IMG, width=6, num_heads=3).to(device).layers[0]  # a 3x3 convolution
    x = torch.randn(1, 2, 5, 5, device=device)
    moved = x.clone()
    moved[..., 2, 3] += 3.0  # a neighbour of pixel (2, 2), outside the patch of pixel (0, 0)
    before, after = layer.route(x), layer.route(moved)
    assert (before[..., 2, 2] - after[..., 2, 2]).abs().max() > 1e-3
    torch.testing.assert_close(before[..., 0, 0], after[..., 0, 0], rtol=0, atol=0)


def test_parameter_count(n_params):
    d, w, r, n = 6, 8, 2, 3
    model = build("hydralora", VEC, width=w, depth=2, rank=r, num_heads=n)
    per_layer = lambda d_in, d_out: r * d_in + n * r * d_out + d_in * n  # A, N heads B_i, router
    adapters = per_layer(d, w) + per_layer(w, w)
    backbone = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == backbone + adapters + heads
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == 2 * w + 2  # only the head


def test_adapters_are_shared_and_only_heads_learn_first(device, params_with_grad):
    torch.manual_seed(0)
    model = build("hydralora", VEC, width=8, num_heads=3).to(device)
    assert not any(p.requires_grad for layer in model.layers for p in layer.base.parameters())
    x = torch.randn(5, 6, device=device)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    # B_i = 0 blocks the gradient to A and to the router; every head B_i gets a share (ω_i > 0).
    expected = {f"layers.{k}.up.{i}.weight" for k in range(2) for i in range(3)} | {"heads.a.0.weight", "heads.a.0.bias"}
    assert touched == expected
    randomise_heads(model)
    for task in ("a", "b"):
        touched = params_with_grad(model, model(x)[task].square().sum())
        assert {"layers.0.down.weight", "layers.0.router.weight", "layers.1.up.2.weight"} <= touched
    assert type(model) is HydraLoRA and model.name == "hydralora"


def test_encode_decode_matches_forward(device):
    torch.manual_seed(0)
    model = build("hydralora", IMG, width=6).to(device)
    randomise_heads(model)
    x = torch.randn(2, 2, 5, 5, device=device)
    out, via = model(x), model.decode(model.encode(x))
    for t in IMG.tasks:
        torch.testing.assert_close(out[t], via[t])


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("hydralora", device)
    first, last = short_training("hydralora", dense, device, steps=40)
    assert last < 0.8 * first


def test_router_of_a_strided_convolution_strides_like_the_layer(device):
    """ω for a stride-2 conv: softmax over heads of a bias-free conv with the layer's stride and
    padding, so it has the layer output's spatial size and the update can be added to it."""
    from reference_impls.architectures.hydralora import HydraAdapted

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1)
    adapted = HydraAdapted(layer, rank=2, num_heads=3, alpha=2.0).to(device).double()
    with torch.no_grad():
        for up in adapted.up:
            up.weight.normal_()
    x = torch.randn(2, 2, 7, 7, device=device, dtype=torch.float64)
    by_hand = torch.softmax(F.conv2d(x, adapted.router.weight, stride=2, padding=1), dim=1)
    assert by_hand.shape[-2:] == adapted.base(x).shape[-2:] == (4, 4)
    torch.testing.assert_close(adapted.route(x), by_hand, rtol=1e-12, atol=1e-12)
    z = F.conv2d(x, adapted.down.weight, stride=2, padding=1)  # A x, with A's own geometry
    heads = torch.stack([F.conv2d(z, up.weight) for up in adapted.up], dim=1)
    expected = adapted.base(x) + adapted.scale * (by_hand[:, :, None] * heads).sum(1)
    torch.testing.assert_close(adapted(x), expected, rtol=1e-12, atol=1e-12)


def test_a_single_head_is_plain_lora():
    """N = 1 is allowed: the router's softmax over one head is 1, so the layer is W0 x + (α / r) B A x."""
    torch.manual_seed(0)
    model = build("hydralora", VEC, width=6, rank=2, num_heads=1)
    randomise_heads(model)
    layer, x = model.layers[0], torch.randn(5, 6)
    expected = x @ layer.base.weight.T + layer.base.bias + x @ (layer.up[0].weight @ layer.down.weight).T
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="num_heads"):
        build("hydralora", VEC, width=6, num_heads=0)
