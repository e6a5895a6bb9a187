"""Residual adapters: y + α_t * BN'(y), zero adapters = shared network, C^2 + 4C per layer."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.residual_adapters import ResidualAdapters
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def zero_adapters(model):
    with torch.no_grad():
        for layer in model.layers:
            for alpha in layer.alpha.values():
                alpha.weight.zero_()


def test_zero_adapters_give_the_shared_network(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("residual_adapters", problem, width=6).to(device)
        x = torch.randn(8, *problem.input_shape, device=device)
        trained_a = model(x)["a"]
        zero_adapters(model)
        # alpha = 0: each task is the shared layers, each followed by the task's own batch norm.
        for t in problem.tasks:
            h = x
            for layer in model.layers:
                h = torch.relu(layer.norm_out[t](layer.shared(h)))
            torch.testing.assert_close(model(x)[t], model.heads[t](h))
        assert not torch.allclose(trained_a, model(x)["a"])  # the adapters did change the output
        # ... and with untrained norms in eval mode (mean 0, variance 1) it is the shared network.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        model.eval()
        backbone = torch.nn.Sequential(*[torch.nn.Sequential(layer.shared, torch.nn.ReLU()) for layer in model.layers])
        shared = SharedBottom(problem.tasks, copy.deepcopy(backbone), copy.deepcopy(model.heads))
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], shared(x)[t], rtol=1e-4, atol=1e-5)


def test_adapter_is_a_residual_one_by_one_convolution(device):
    torch.manual_seed(0)
    model = build("residual_adapters", IMG, width=4).to(device)
    layer, x = model.layers[1], torch.randn(3, 4, 5, 5, device=device)
    alpha = layer.alpha["b"].weight  # (C, C): a bank of 1x1 filters
    assert alpha.shape == (4, 4)
    y = layer.shared(x)
    inner = F.batch_norm(y, None, None, layer.norm_in["b"].weight, layer.norm_in["b"].bias, training=True)
    adapted = y + F.conv2d(inner, alpha[:, :, None, None])  # g(y; α) = y + α * BN'(y)
    expected = F.batch_norm(adapted, None, None, layer.norm_out["b"].weight, layer.norm_out["b"].bias, training=True)
    torch.testing.assert_close(layer(x, "b"), expected, rtol=1e-4, atol=1e-5)


def test_parameter_count(n_params):
    c_in, w, k = 2, 8, 3
    model = build("residual_adapters", IMG, width=w, depth=2)
    per_layer = w * w + 4 * w  # α_t (C x C, no bias) + two BN scale/shift pairs
    heads = {"a": 3 * w + 3, "b": w + 1}
    shared = (k * k * c_in * w + w) + (k * k * w * w + w)
    for t in IMG.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == 2 * per_layer + heads[t]
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    assert n_params(model) == shared + 2 * 2 * per_layer + sum(heads.values())


def test_only_adapters_norms_and_heads_learn(device, params_with_grad):
    torch.manual_seed(0)
    model = build("residual_adapters", VEC, width=8).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    x = torch.randn(6, 6, device=device)
    for t in VEC.tasks:  # each task reads its own α_t, BN'_t and BN''_t, none of another task's
        touched = params_with_grad(model, model(x)[t].square().sum())
        expected = {f"layers.{i}.{part}.{t}.{p}" for i in (0, 1)
                    for part, p in [("alpha", "weight"), ("norm_in", "weight"), ("norm_in", "bias"),
                                    ("norm_out", "weight"), ("norm_out", "bias")]}
        # The last layer's output norm feeds the head; its shift reaches the loss, so every part learns.
        assert touched == expected | {f"heads.{t}.0.weight", f"heads.{t}.0.bias"}


def test_unfrozen_backbone_is_trained_by_every_task(device, params_with_grad):
    torch.manual_seed(0)
    model = build("residual_adapters", VEC, width=8, freeze_backbone=False).to(device)
    x = torch.randn(6, 6, device=device)
    for t in VEC.tasks:
        touched = params_with_grad(model, model(x)[t].square().sum())
        assert {"layers.0.shared.weight", "layers.1.shared.weight"} <= touched
    assert type(model) is ResidualAdapters and model.name == "residual_adapters"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("residual_adapters", device)
    first, last = short_training("residual_adapters", dense, device, steps=40)
    assert last < 0.8 * first
