"""Prefix-tuning: attention over [prefix; tokens] by hand, MLP reparameterisation, frozen backbone."""

import math

import pytest
import torch

from reference_impls.architectures.prefix_tuning import Attention, PrefixTuning, TransformerLayer
from reference_impls.architectures.registry import Problem, build

from .conftest import layer_norm_by_hand

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def test_prefixed_attention_matches_a_hand_computation(device):
    torch.manual_seed(0)
    att = Attention(6, 2).to(device)
    h = torch.randn(3, 4, 6, device=device)
    pk, pv = torch.randn(5, 6, device=device), torch.randn(5, 6, device=device)
    outs = []
    for b in range(3):  # one example, one head at a time, keys = [P_k; C W_k]
        heads = []
        for i in range(2):
            cols = slice(3 * i, 3 * i + 3)
            q = (h[b] @ att.query.weight.T + att.query.bias)[:, cols]
            k = torch.cat([pk, h[b] @ att.key.weight.T + att.key.bias])[:, cols]
            v = torch.cat([pv, h[b] @ att.value.weight.T + att.value.bias])[:, cols]
            heads.append(torch.softmax(q @ k.T / math.sqrt(3), dim=-1) @ v)
        outs.append(torch.cat(heads, dim=1) @ att.out.weight.T + att.out.bias)
    torch.testing.assert_close(att(h, pk, pv), torch.stack(outs))
    assert not torch.allclose(att(h, pk, pv), att(h))  # the prefix does change attention


def test_prefix_comes_from_the_mlp_and_export_keeps_only_its_output(device):
    torch.manual_seed(0)
    model = build("prefix_tuning", VEC, width=8, depth=3, num_heads=2, prefix_length=5).to(device)
    gen = model.prefixes["a"]
    flat = gen.mlp(gen.small)  # (P, 2 L d), P_θ[i, :] = MLP_θ(P'_θ[i, :])
    prefix = model.prefix("a")
    assert prefix.shape == (3, 2, 5, 8)
    for layer in range(3):
        for kv in range(2):
            start = (2 * layer + kv) * 8
            torch.testing.assert_close(prefix[layer, kv], flat[:, start:start + 8])
    x = torch.randn(4, 12, device=device)
    before = model(x)
    model.export_prefixes()
    with torch.no_grad():  # after export the MLP no longer matters
        for p in gen.parameters():
            p.add_(1.0)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], before[t])




def test_transformer_layer_is_post_ln():
    """a = LN1(h + MH(h)), h' = LN2(a + FFN(a)): the norms come after each residual sum."""
    torch.manual_seed(0)
    layer = TransformerLayer(6, 2).double()
    with torch.no_grad():  # norms away from the identity, so their placement shows
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    h = torch.randn(3, 4, 6, dtype=torch.float64)
    pk, pv = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a = layer_norm_by_hand(h + layer.attention(h, pk, pv), layer.norm1)
    expected = layer_norm_by_hand(a + layer.feed_forward(a), layer.norm2)
    torch.testing.assert_close(layer(h, pk, pv), expected)


def test_prefix_mlp_is_linear_tanh_linear_with_default_widths():
    """P' is P x d/2 and the hidden layer 2d wide by default; MLP(P') = W2 tanh(W1 P' + b1) + b2."""
    torch.manual_seed(0)
    d, depth, length = 8, 3, 5
    model = build("prefix_tuning", VEC, width=d, depth=depth, num_heads=2, prefix_length=length).double()
    gen = model.prefixes["a"]
    first, second = gen.mlp[0], gen.mlp[-1]
    assert gen.small.shape == (length, d // 2) and first.weight.shape == (2 * d, d // 2)
    flat = torch.tanh(gen.small @ first.weight.T + first.bias) @ second.weight.T + second.bias
    expected = flat.view(length, depth, 2, d).permute(1, 2, 0, 3)  # column block (2 l + kv) is layer l's kv
    torch.testing.assert_close(model.prefix("a"), expected)


def test_exported_prefix_is_detached_from_the_mlp():
    """After export the loss reaches no MLP parameter: the MLP can be dropped."""
    torch.manual_seed(0)
    model = build("prefix_tuning", VEC, width=8, num_heads=2)
    model.export_prefixes()
    assert not model.prefix("a").requires_grad
    model(torch.randn(3, 12))["a"].square().sum().backward()
    assert all(p.grad is None for p in model.prefixes.parameters())
    assert any(p.grad is not None for p in model.heads["a"].parameters())


def test_every_layer_attends_over_its_own_prefix(device):
    """Layer l reads keys prefix[l, 0] and values prefix[l, 1] (not layer 0's, not only the first layer)."""
    torch.manual_seed(0)
    model = build("prefix_tuning", VEC, width=8, depth=3, num_heads=2).to(device)
    x = torch.randn(4, 12, device=device)
    prefix, h = model.prefix("b"), model.tokenizer(x)
    for layer, (keys, values) in zip(model.layers, prefix):
        h = layer(h, keys, values)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h))
    assert not torch.allclose(prefix[1], prefix[0])


def test_exported_prefixes_follow_the_model_and_are_saved():
    """After export the prefix is module state: .double() converts it, state_dict keeps it."""
    torch.manual_seed(0)
    model = build("prefix_tuning", VEC, width=8, num_heads=2)
    model.export_prefixes()
    saved = model.state_dict()
    torch.testing.assert_close(saved["exported_1"], model.prefixes["b"]().detach())
    model.double()
    assert model.prefix("a").dtype == torch.float64
    assert model(torch.randn(3, 12, dtype=torch.float64))["a"].dtype == torch.float64


def test_a_checkpoint_saved_after_export_loads_into_a_fresh_model():
    torch.manual_seed(0)
    trained = build("prefix_tuning", VEC, width=8, num_heads=2)
    trained.export_prefixes()
    torch.manual_seed(1)  # different generator weights: only the checkpoint can make them agree
    fresh = build("prefix_tuning", VEC, width=8, num_heads=2)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh.prefix("b"), trained.prefix("b"))
    torch.testing.assert_close(fresh(x)["a"], trained(x)["a"])


def test_parameter_counts(n_params):
    w, depth, length, small, hidden = 8, 3, 5, 4, 16
    model = build("prefix_tuning", VEC, width=w, depth=depth, num_heads=2, prefix_length=length,
                  small=small, hidden=hidden)
    generator = length * small + (small * hidden + hidden) + (hidden * 2 * depth * w + 2 * depth * w)
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == generator + heads[t]
    assert model.prefix("a").numel() == 2 * depth * length * w  # what is kept after training


def test_backbone_gets_no_gradient(device, params_with_grad):
    torch.manual_seed(0)
    model = build("prefix_tuning", VEC, width=8, num_heads=2).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["b"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("b"))}
    assert touched == specific and all(n.startswith(("prefixes.b.", "heads.b.")) for n in touched)
    assert type(model) is PrefixTuning


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("prefix_tuning", device)
    first, last = short_training("prefix_tuning", dense, device, steps=30)
    assert last < 0.8 * first
