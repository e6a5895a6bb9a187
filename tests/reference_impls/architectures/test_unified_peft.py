"""Unified view: prefix attention == gated adapter (1 - λ) h + λ softmax(x W_1) W_2; scaled PA."""


import pytest
import torch

from reference_impls.architectures.prefix_tuning import Attention
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.unified_peft import UnifiedPEFT, prefix_as_gated_adapter

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def test_prefix_tuning_equals_the_gated_adapter_form(device):
    torch.manual_seed(0)
    att = Attention(8, 2).to(device)
    h = torch.randn(3, 5, 8, device=device)
    pk, pv = torch.randn(4, 8, device=device) * 2, torch.randn(4, 8, device=device)
    torch.testing.assert_close(prefix_as_gated_adapter(att, h, pk, pv), att(h, pk, pv))


def test_gate_lambda_by_hand(device):
    """One head, one query: λ = Σ exp(q P_k) / (Σ exp(q P_k) + Σ exp(q K)), and the mix it makes."""
    torch.manual_seed(0)
    att = Attention(4, 1).to(device)
    h = torch.randn(1, 3, 4, device=device)
    pk, pv = torch.randn(2, 4, device=device), torch.randn(2, 4, device=device)
    q, k, v = att.query(h)[0], att.key(h)[0], att.value(h)[0]
    e_prefix, e_tokens = torch.exp(q @ pk.T / 2), torch.exp(q @ k.T / 2)  # sqrt(d_h) = 2
    lam = e_prefix.sum(1, keepdim=True) / (e_prefix.sum(1, keepdim=True) + e_tokens.sum(1, keepdim=True))
    plain = (e_tokens / e_tokens.sum(1, keepdim=True)) @ v
    adapter = (e_prefix / e_prefix.sum(1, keepdim=True)) @ pv  # softmax(x W_1) W_2, W_1 = W_q P_k^T, W_2 = P_v
    expected = ((1 - lam) * plain + lam * adapter) @ att.out.weight.T + att.out.bias
    torch.testing.assert_close(prefix_as_gated_adapter(att, h, pk, pv)[0], expected)
    assert 0 < lam.min() and lam.max() < 1


def test_scaled_parallel_adapter_starts_at_zero_and_is_scaled(device):
    torch.manual_seed(0)
    model = build("unified_peft", VEC, width=8, num_heads=2, prefix_length=0, scale=4.0).to(device)
    x = torch.randn(3, 12, device=device)
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](h), rtol=0, atol=0)  # P = 0, W_up = 0: backbone
    pa = model.modules_per_task["a"][0].adapter
    with torch.no_grad():
        pa.up.weight.normal_()
    z = torch.randn(2, 5, 8, device=device)
    torch.testing.assert_close(pa(z), 4.0 * (torch.relu(z @ pa.down.weight.T + pa.down.bias) @ pa.up.weight.T
                                             + pa.up.bias))


def test_parallel_adapter_reads_the_ffn_input(device):
    torch.manual_seed(0)
    model = build("unified_peft", VEC, width=8, depth=1, num_heads=2).to(device)
    mods, layer = model.modules_per_task["b"][0], model.layers[0]
    with torch.no_grad():
        mods.adapter.up.weight.normal_()
    x = torch.randn(3, 12, device=device)
    h = model.tokenizer(x)
    a = layer.norm1(h + layer.attention(h, mods.prefix_keys, mods.prefix_values))
    out = layer.norm2(a + layer.feed_forward(a) + 4.0 * mods.adapter.up(torch.relu(mods.adapter.down(a))))
    torch.testing.assert_close(model(x)["b"], model.heads["b"](out))


def _assert_per_task_count(model, w, depth, length, r):
    """Per task: 2 L P d prefix values, L (2 r d + r + d) adapter parameters, and the head."""
    heads = {"a": w + 1, "b": 2 * w + 2}
    per_task = 2 * depth * length * w + depth * (2 * r * w + r + w)
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task + heads[t], t


def test_default_prefix_length_and_bottleneck():
    """Our defaults: P = 4 prefix vectors, bottleneck r = d / 4."""
    w, depth = 16, 2
    model = build("unified_peft", VEC, width=w, depth=depth, num_heads=2)
    _assert_per_task_count(model, w, depth, length=4, r=4)
    assert model.modules_per_task["a"][0].prefix_keys.shape == (4, w)
    narrow = build("unified_peft", VEC, width=4, depth=1, num_heads=2)  # r = 4 / 4 = 1
    assert narrow.modules_per_task["a"][0].adapter.down.out_features == 1


def test_parameter_count_and_frozen_backbone(device, params_with_grad):
    w, depth, length, r = 8, 3, 5, 2
    model = build("unified_peft", VEC, width=w, depth=depth, num_heads=2, prefix_length=length, bottleneck=r)
    model = model.to(device)
    _assert_per_task_count(model, w, depth, length, r)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    assert all(n.startswith(("modules_per_task.a.", "heads.a.")) for n in touched)
    assert "modules_per_task.a.0.prefix_keys" in touched and "modules_per_task.a.1.adapter.up.weight" in touched
    assert type(model) is UnifiedPEFT


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("unified_peft", device)
    first, last = short_training("unified_peft", dense, device, steps=30)
    assert last < 0.8 * first
