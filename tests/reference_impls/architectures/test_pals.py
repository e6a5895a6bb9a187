"""PALs: TS(h) = V^D g(V^E h) added in parallel, V^E/V^D shared across layers, zero PAL = base."""

import math

import pytest
import torch

from reference_impls.architectures.pals import PALs
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1}, dense=True)


def attention_by_hand(z, qkv, heads):
    """Multi-head self-attention without an output matrix, one head at a time."""
    d = z.shape[-1] // heads
    q, k, v = (z @ w.T + b for w, b in zip(qkv.weight.chunk(3), qkv.bias.chunk(3)))
    outs = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(weights @ v[..., s])
    return torch.cat(outs, dim=-1)


def test_pal_term_is_added_in_parallel_to_the_layer(device):
    torch.manual_seed(0)
    model = build("pals", VEC, width=8, num_heads=2, pal_dim=4, pal_heads=2).to(device)
    layer, h = model.layers[1], torch.randn(3, 5, 8, device=device)
    enc, dec = model.encoders["b"], model.decoders["b"]
    ts = dec(attention_by_hand(enc(h), layer.task_attention["b"].qkv, 2))  # TS(h) = V^D g(V^E h)
    torch.testing.assert_close(model.task_term(layer, h, "b"), ts)
    a = layer.norm1(h + layer.attention(h, h, h, need_weights=False)[0])
    expected = layer.norm2(a + layer.feed_forward(a) + ts)  # TS reads the layer's input h, not a
    torch.testing.assert_close(layer(h, model.task_term(layer, h, "b")), expected)


def test_layer_is_post_ln_with_its_first_norm_after_attention_and_its_second_after_the_sum(device):
    """a = LN1(h + MH(h)), layer_t = LN2(a + FFN(a) + TS), the norms written out with distinct affine maps."""
    from .conftest import layer_norm_by_hand

    torch.manual_seed(0)
    model = build("pals", VEC, width=8, num_heads=2, pal_dim=4, pal_heads=2).to(device).double()
    layer = model.layers[0]
    with torch.no_grad():  # norms away from the identity, so that their order shows
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    h = torch.randn(3, 5, 8, device=device, dtype=torch.float64)
    ts = torch.randn(3, 5, 8, device=device, dtype=torch.float64)
    a = layer_norm_by_hand(h + layer.attention(h, h, h, need_weights=False)[0], layer.norm1)
    expected = layer_norm_by_hand(a + layer.feed_forward(a) + ts, layer.norm2)
    torch.testing.assert_close(layer(h, ts), expected, rtol=1e-10, atol=1e-10)


def test_forward_feeds_each_pal_the_input_of_its_layer(device):
    """The whole model by hand: layer l gets TS_t(h_l) from its own input h_l, not from a = LN1(...)."""
    torch.manual_seed(0)
    model = build("pals", VEC, width=8, depth=2, num_heads=2, pal_dim=4, pal_heads=2).to(device)
    x = torch.randn(3, 12, device=device)
    for t in VEC.tasks:
        h = model.tokenizer(x)
        for layer in model.layers:
            ts = model.decoders[t](attention_by_hand(model.encoders[t](h), layer.task_attention[t].qkv, 2))
            a = layer.norm1(h + layer.attention(h, h, h, need_weights=False)[0])
            h = layer.norm2(a + layer.feed_forward(a) + ts)
        torch.testing.assert_close(model(x)[t], model.heads[t](h))


def test_zero_pal_is_the_shared_transformer(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("pals", problem, width=8, num_heads=2).to(device)
        x = torch.randn(4, *problem.input_shape, device=device)
        before = model(x)["a"]
        with torch.no_grad():
            for dec in model.decoders.values():
                dec.weight.zero_()
                dec.bias.zero_()
        h = model.tokenizer(x)
        for layer in model.layers:
            h = layer(h)  # no task term at all
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], model.heads[t](h))
        assert not torch.allclose(before, model(x)["a"])  # the PALs did contribute before


def test_projections_are_one_tensor_used_by_every_layer(device):
    torch.manual_seed(0)
    depth = 3
    model = build("pals", VEC, width=8, depth=depth, num_heads=2).to(device)
    calls = {"encoder": 0, "decoder": 0}
    model.encoders["a"].register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.decoders["a"].register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    model(torch.randn(2, 12, device=device))
    assert calls == {"encoder": depth, "decoder": depth}  # the same V^E_a, V^D_a in all layers
    names = [n for n, _ in model.named_parameters() if n.startswith(("encoders.a.", "decoders.a."))]
    assert sorted(names) == ["decoders.a.bias", "decoders.a.weight", "encoders.a.bias", "encoders.a.weight"]
    assert len({id(layer.task_attention["a"].qkv.weight) for layer in model.layers}) == depth  # g: one per layer
    assert not torch.equal(model.encoders["a"].weight, model.encoders["b"].weight)  # but one V^E per task


def test_parameter_count(n_params):
    d_m, d_s, depth = 8, 4, 3
    model = build("pals", VEC, width=d_m, depth=depth, num_heads=2, pal_dim=d_s, pal_heads=2)
    projections = 2 * d_m * d_s + d_m + d_s  # V^E and V^D with biases
    attention = depth * 3 * (d_s * d_s + d_s)  # q, k, v per layer, no output matrix
    heads = {"a": d_m + 1, "b": 2 * d_m + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == projections + attention + heads[t]
    layer = 4 * d_m * d_m + 4 * d_m + 2 * (2 * d_m * d_m) + 3 * d_m + 4 * d_m  # attention, FFN, 2 LN
    tokenizer = 2 * d_m + d_m + 6 * d_m  # 12 features -> 6 tokens of 2, plus positions
    assert sum(p.numel() for p in model.shared_parameters()) == tokenizer + depth * layer
    assert n_params(model) == tokenizer + depth * layer + 2 * (projections + attention) + sum(heads.values())


def test_tasks_train_the_shared_layers_and_only_their_own_pals(device, params_with_grad):
    torch.manual_seed(0)
    model = build("pals", VEC, width=8, num_heads=2).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    assert {"tokenizer.embed.weight", "layers.0.attention.in_proj_weight", "layers.1.feed_forward.0.weight",
            "encoders.a.weight", "decoders.a.weight", "layers.0.task_attention.a.qkv.weight",
            "layers.1.task_attention.a.qkv.weight", "heads.a.linear.weight"} <= touched
    assert not any(".b." in n or n.endswith(".b") for n in touched)
    assert type(model) is PALs and model.name == "pals"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("pals", device)
    first, last = short_training("pals", dense, device, steps=25)
    assert last < 0.8 * first


def test_projected_attention_scales_scores_by_the_head_width():
    """g's scores are divided by sqrt(d_s / heads), the width of one head (here 6, with 2 heads)."""
    from reference_impls.architectures.pals import ProjectedAttention
    torch.manual_seed(3)
    g = ProjectedAttention(12, 2).double()
    z = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(g(z), attention_by_hand(z, g.qkv, 2))
