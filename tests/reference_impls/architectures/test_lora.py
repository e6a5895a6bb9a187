"""LoRA: identity at init, rank <= r, merged weights, r (d_in + d_out) per layer, frozen W0."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.lora import LoRA, low_rank_pair
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise_updates(model, seed=0):
    """Give every B a random value (B starts at 0), so the updates are no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up.values():
                up.weight.copy_(torch.randn(up.weight.shape, generator=g).to(up.weight))


def plain(model, problem):
    """The backbone layers and heads without any update, as a shared-bottom model."""
    layers = [torch.nn.Sequential(layer.base, torch.nn.ReLU()) for layer in model.layers]
    return SharedBottom(problem.tasks, copy.deepcopy(torch.nn.Sequential(*layers)), copy.deepcopy(model.heads))


def apply_merged(model, x, task):
    """The task's network with W0 + (α/r) B A as ordinary weights, computed without the model."""
    h = x
    for layer in model.layers:
        w, bias = layer.merged_weight(task), layer.base.bias
        h = F.linear(h, w, bias) if w.ndim == 2 else F.conv2d(h, w, bias, padding=layer.base.padding)
        h = torch.relu(h)
    return model.heads[task](h)


def test_untrained_model_is_the_backbone(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("lora", problem, width=6, rank=2).to(device)
        x = torch.randn(4, *problem.input_shape, device=device)
        reference = plain(model, problem)
        for t in problem.tasks:
            assert all((layer.up[t].weight == 0).all() for layer in model.layers)  # B = 0
            torch.testing.assert_close(model(x)[t], reference(x)[t], rtol=0, atol=0)


def test_update_has_rank_at_most_r():
    r = 2
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("lora", problem, width=8, rank=r)
        randomise_updates(model)
        for layer in model.layers:
            delta = layer.delta_weight("a").flatten(1)  # d_out x d_in (C_in k k for convolutions)
            assert delta.shape == layer.base.weight.flatten(1).shape and min(delta.shape) > r
            assert torch.linalg.matrix_rank(delta).item() == r  # random B A: exactly r
            full = layer.merged_weight("a").flatten(1) - layer.base.weight.flatten(1)
            torch.testing.assert_close(full, delta)


def test_the_docstring_rank_of_loralib_style_conv_factors():
    """The docstring's contrast: loralib's (C_out k) x (r k) times (r k) x (C_in k) product,
    reshaped to the kernel, reaches rank r k² as a C_out x (C_in k k) matrix, not r."""
    r, k, c_in, c_out = 2, 3, 16, 64
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r * k, c_in * k, generator=g, dtype=torch.float64)
    b = torch.randn(c_out * k, r * k, generator=g, dtype=torch.float64)
    assert torch.linalg.matrix_rank(b @ a).item() == r * k
    assert torch.linalg.matrix_rank((b @ a).view(c_out, c_in, k, k).flatten(1)).item() == r * k * k == 18


def test_merging_the_update_into_w_gives_the_same_output(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("lora", problem, width=6, rank=3, alpha=1.5).to(device)
        randomise_updates(model)
        x = torch.randn(4, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            torch.testing.assert_close(out[t], apply_merged(model, x, t), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out["a"], plain(model, problem)(x)["a"])  # the update changes the output


def test_scale_is_alpha_over_r(device):
    torch.manual_seed(0)
    model = build("lora", VEC, width=6, rank=2, alpha=3.0).to(device)
    randomise_updates(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    a, b = layer.down["b"].weight, layer.up["b"].weight
    expected = x @ layer.base.weight.T + layer.base.bias + (3.0 / 2) * x @ (b @ a).T  # Eq. (3) scaled
    torch.testing.assert_close(layer(x, "b"), expected)
    default = build("lora", VEC, width=6, rank=2).to(device)
    assert all(layer.scale == 1.0 for layer in default.layers)  # α defaults to r: B A is used unscaled


def init_moments(weight):
    """The standard deviation and kurtosis of a weight's entries (a Gaussian's kurtosis is 3, a uniform's 1.8)."""
    w = weight.detach().double().flatten()
    std = w.std()
    return std.item(), ((w - w.mean()) ** 4).mean().item() / std.item() ** 4


def test_a_starts_gaussian_with_std_one_over_sqrt_d_in():
    torch.manual_seed(0)
    layers = {400: torch.nn.Linear(400, 300), 16 * 3 * 3: torch.nn.Conv2d(16, 32, 3, padding=1)}
    for d_in, layer in layers.items():  # d_in = C_in k k for a kernel
        down, up = low_rank_pair(layer, 64)
        std, kurtosis = init_moments(down.weight)
        assert abs(std * d_in**0.5 - 1) < 0.05
        assert abs(kurtosis - 3) < 0.3  # Gaussian, not uniform
        assert (up.weight == 0).all()


def test_parameter_count(n_params):
    d, w, r = 6, 8, 2
    model = build("lora", VEC, width=w, depth=2, rank=r)
    per_task = r * (d + w) + r * (w + w)  # r (d_in + d_out) per layer
    heads = {"a": w + 1, "b": 2 * w + 2}
    backbone = (d * w + w) + (w * w + w)
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task + heads[t]
    assert n_params(model) == backbone + 2 * per_task + sum(heads.values())

    c, k = 2, 3
    conv = build("lora", IMG, width=w, depth=2, rank=r)
    conv_per_task = r * (c * k * k + w) + r * (w * k * k + w)  # d_in = C_in k k for a kernel
    heads = {"a": 3 * w + 3, "b": w + 1}
    assert sum(p.numel() for p in conv.task_specific_parameters("a")) == conv_per_task + heads["a"]


def test_frozen_backbone_and_only_b_learns_first(device, params_with_grad):
    torch.manual_seed(0)
    model = build("lora", VEC, width=8).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    x = torch.randn(5, 6, device=device)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    # B = 0 blocks the gradient to A (dL/dA = B^T ...), so at init only B and the head learn.
    assert touched == {"layers.0.up.a.weight", "layers.1.up.a.weight", "heads.a.0.weight", "heads.a.0.bias"}
    randomise_updates(model)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert {"layers.0.down.a.weight", "layers.1.down.a.weight"} <= touched
    assert not any(".b." in n or n.startswith("heads.b") or ".base." in n for n in touched)


def test_unfrozen_backbone_is_shared_and_trainable(device, params_with_grad):
    torch.manual_seed(0)
    model = build("lora", VEC, width=8, freeze_backbone=False).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 6, device=device))["b"].square().sum())
    assert {"layers.0.base.weight", "layers.1.base.bias"} <= touched
    assert type(model) is LoRA and model.name == "lora"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("lora", device)
    first, last = short_training("lora", dense, device, steps=40)
    assert last < 0.8 * first
