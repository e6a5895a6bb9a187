"""Parallel residual adapters: BN_t(w * x + α_t * x), one merged kernel, C_in C_out + 2 C_out per layer."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.architectures.parallel_residual_adapters import (
    ParallelAdaptedLayer,
    ParallelResidualAdapters,
    parallel_filters,
)
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def batch_norm(y, norm):
    return F.batch_norm(y, None, None, norm.weight, norm.bias, training=True)


def test_adapter_reads_the_layer_input_in_parallel(device):
    torch.manual_seed(0)
    model = build("parallel_residual_adapters", IMG, width=4).to(device)
    layer, x = model.layers[0], torch.randn(3, 2, 5, 5, device=device)
    alpha = layer.alpha["b"].weight
    assert alpha.shape == (4, 2, 1, 1)  # C_out x C_in 1x1 filters: input channels, not output ones
    shared = F.conv2d(x, layer.shared.weight, layer.shared.bias, padding=1)
    expected = batch_norm(shared + torch.einsum("oc,bchw->bohw", alpha[:, :, 0, 0], x), layer.norm["b"])
    torch.testing.assert_close(layer(x, "b"), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer(x, "a"), expected)  # each task has its own α_t and BN_t


def test_parallel_branches_equal_one_merged_kernel(device):
    torch.manual_seed(0)
    for problem, shape in ((IMG, (3, 2, 5, 5)), (VEC, (5, 6))):
        model = build("parallel_residual_adapters", problem, width=4).to(device)
        x = torch.randn(*shape, device=device)
        for layer in model.layers:
            for t in problem.tasks:
                kernel = layer.merged_kernel(t)
                assert kernel.shape == layer.shared.weight.shape
                torch.testing.assert_close(layer.merged_forward(x, t), layer(x, t), rtol=1e-4, atol=1e-5)
            x = torch.relu(layer(x, "a"))
    conv = build("parallel_residual_adapters", IMG, width=4).layers[0]
    change = conv.merged_kernel("a") - conv.shared.weight  # α_t sits at the kernel's centre only
    torch.testing.assert_close(change[..., 1, 1], conv.alpha["a"].weight[..., 0, 0])
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    assert torch.all(change[..., off_centre] == 0)


def test_merged_kernel_keeps_the_shared_bias_under_running_statistics(device):
    # In training mode the batch norm removes any bias; with running statistics it does not.
    torch.manual_seed(0)
    for problem, shape in ((IMG, (3, 2, 5, 5)), (VEC, (5, 6))):
        layer = build("parallel_residual_adapters", problem, width=4).layers[0].to(device)
        x = torch.randn(*shape, device=device)
        layer(x, "a")  # moves BN_a's running statistics away from (0, 1)
        layer.eval()
        assert layer.shared.bias.abs().sum() > 0
        torch.testing.assert_close(layer.merged_forward(x, "a"), layer(x, "a"), rtol=1e-4, atol=1e-5)


def test_adapter_takes_the_shared_convolutions_stride(device):
    torch.manual_seed(0)
    layer = ParallelAdaptedLayer(torch.nn.Conv2d(2, 4, 3, stride=2, padding=1), ("a",)).to(device)
    assert layer.alpha["a"].stride == (2, 2)
    x = torch.randn(3, 2, 6, 6, device=device)
    shared = F.conv2d(x, layer.shared.weight, layer.shared.bias, stride=2, padding=1)
    strided = shared + torch.einsum("oc,bchw->bohw", layer.alpha["a"].weight[:, :, 0, 0], x[..., ::2, ::2])
    torch.testing.assert_close(layer(x, "a"), batch_norm(strided, layer.norm["a"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.merged_forward(x, "a"), layer(x, "a"), rtol=1e-4, atol=1e-5)


def test_merging_and_adapters_need_a_centred_ordinary_kernel():
    with pytest.raises(ValueError, match="ungrouped"):
        parallel_filters(torch.nn.Conv2d(4, 4, 3, padding=1, groups=2))
    with pytest.raises(ValueError, match="ungrouped"):
        parallel_filters(torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    for conv in (torch.nn.Conv2d(2, 4, 3, padding=0), torch.nn.Conv2d(2, 4, 2, padding=1),
                 torch.nn.Conv2d(2, 4, (3, 5), padding=1)):
        with pytest.raises(ValueError, match="odd kernel with 'same' padding"):  # α_t * x would not fit w * x
            ParallelAdaptedLayer(conv, ("a",))


def test_zero_adapters_give_the_shared_layers_with_task_norms(device):
    torch.manual_seed(0)
    model = build("parallel_residual_adapters", IMG, width=4).to(device)
    x = torch.randn(4, 2, 5, 5, device=device)
    before = model(x)["a"]
    with torch.no_grad():
        for layer in model.layers:
            for alpha in layer.alpha.values():
                alpha.weight.zero_()
    for t in IMG.tasks:
        h = x
        for layer in model.layers:
            h = torch.relu(batch_norm(layer.shared(h), layer.norm[t]))
        torch.testing.assert_close(model(x)[t], model.heads[t](h), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, model(x)["a"])


def test_parameter_count(n_params):
    c_in, w, k = 2, 8, 3
    model = build("parallel_residual_adapters", IMG, width=w, depth=2)
    adapters = (c_in * w + 2 * w) + (w * w + 2 * w)  # α_t: C_in x C_out 1x1 filters, BN_t: 2 C_out
    heads = {"a": 3 * w + 3, "b": w + 1}
    shared = (k * k * c_in * w + w) + (k * k * w * w + w)
    for t in IMG.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == adapters + heads[t]
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    assert n_params(model) == shared + 2 * adapters + sum(heads.values())


def test_only_the_task_adapters_norms_and_head_learn(device, params_with_grad):
    torch.manual_seed(0)
    model = build("parallel_residual_adapters", VEC, width=8).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(6, 6, device=device))["b"].square().sum())
    expected = {f"layers.{i}.{part}.b.{p}" for i in (0, 1)
                for part, p in [("alpha", "weight"), ("norm", "weight"), ("norm", "bias")]}
    assert touched == expected | {"heads.b.0.weight", "heads.b.0.bias"}
    unfrozen = build("parallel_residual_adapters", VEC, width=8, freeze_backbone=False).to(device)
    touched = params_with_grad(unfrozen, unfrozen(torch.randn(6, 6, device=device))["a"].square().sum())
    assert {"layers.0.shared.weight", "layers.1.shared.weight"} <= touched
    assert type(model) is ParallelResidualAdapters


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("parallel_residual_adapters", device)
    first, last = short_training("parallel_residual_adapters", dense, device, steps=40)
    assert last < 0.8 * first



def test_the_model_refuses_such_a_backbone_when_built_naming_kernel_and_padding():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # 8x8 -> 6x6, while a 1x1 filter keeps 8x8
    with pytest.raises(ValueError, match=re.escape("got kernel (3, 3), padding (0, 0)")):
        ParallelResidualAdapters(("a", "b"), backbone, {"a": nn.Flatten(), "b": nn.Flatten()})

def test_a_strided_same_padded_layer_keeps_its_stride_on_both_paths(device):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())
    model = ParallelResidualAdapters(("a", "b"), backbone, {"a": nn.Flatten(), "b": nn.Flatten()}).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    assert model(x)["a"].shape == (2, 4 * 4 * 4)
    layer = model.layers[0]
    torch.testing.assert_close(layer.merged_forward(x, "a"), layer(x, "a"))


def test_each_kernel_side_must_be_odd_on_its_own():
    """(2, 3) or (3, 2) kernels with padding (1, 1) still cannot centre a 1x1 filter: refused."""
    for kernel in ((2, 3), (3, 2)):
        with pytest.raises(ValueError, match="odd kernel with 'same' padding"):
            ParallelAdaptedLayer(nn.Conv2d(2, 4, kernel, padding=(1, 1)), ("a",))


@pytest.mark.parametrize("kernel, padding", [((5, 5), (2, 2)), ((5, 3), (2, 1)), ((3, 5), (1, 2))])
def test_larger_odd_kernels_merge_with_the_adapter_at_their_centre(kernel, padding):
    """Kernel k with padding k // 2 is accepted for every odd k; α_t lands on the centre tap of w."""
    torch.manual_seed(0)
    layer = ParallelAdaptedLayer(nn.Conv2d(2, 3, kernel, padding=padding), ("a",)).eval()
    with torch.no_grad():
        layer.alpha["a"].weight.normal_()
    change = layer.merged_kernel("a") - layer.shared.weight
    centre = change[:, :, kernel[0] // 2, kernel[1] // 2]
    torch.testing.assert_close(centre, layer.alpha["a"].weight[:, :, 0, 0])
    assert change.abs().sum() == centre.abs().sum()  # nothing off the centre
    x = torch.randn(2, 2, 6, 7)
    torch.testing.assert_close(layer.merged_forward(x, "a"), layer(x, "a"))
