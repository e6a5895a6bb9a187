"""Houlsby adapters: near-identity at init, 2md + d + m per bottleneck, only adapters/LN/heads learn."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.houlsby_adapters import (
    Adapter,
    HoulsbyAdapters,
    TokenHead,
    Tokenizer,
    patch_size_for,
)
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1}, dense=True)


def frozen_transformer(model, x, task):
    """The backbone alone: the same layers with every adapter replaced by the identity."""
    h = model.tokenizer(x)
    for layer in model.layers:
        a = layer.attention_norms[task](h + layer.attention(h, h, h, need_weights=False)[0])
        h = layer.feed_forward_norms[task](a + layer.feed_forward(a))
    return model.heads[task](h)


def test_adapter_is_a_skip_connected_bottleneck_near_identity_at_init(device):
    torch.manual_seed(0)
    adapter = Adapter(16, 4).to(device)
    h = torch.randn(3, 5, 16, device=device)
    by_hand = h + F.gelu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(h), by_hand)
    change = (adapter(h) - h).norm() / h.norm()
    assert 0 < change < 1e-4  # near, but not exactly, the identity
    assert all(p.abs().max() <= 2e-3 for p in (adapter.down.weight, adapter.up.weight))  # truncated at 2 std


def test_untrained_model_is_near_the_frozen_transformer(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("houlsby_adapters", problem, width=8, num_heads=2).to(device)
        x = torch.randn(4, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            torch.testing.assert_close(out[t], frozen_transformer(model, x, t), rtol=0, atol=1e-4)
        with torch.no_grad():  # larger adapter weights do move the model away from the backbone
            for p in model.layers[0].attention_adapters["a"].parameters():
                p.normal_()
        assert (model(x)["a"] - frozen_transformer(model, x, "a")).abs().max() > 1e-2


def by_hand(adapter, h):
    """A(h) = h + W_up GELU(W_down h + b_down) + b_up, from the weights."""
    return h + F.gelu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias


def test_adapters_sit_before_each_residual_sum_of_a_layer(device):
    """a = LN1_t(h + A1_t(MH(h))), h' = LN2_t(a + A2_t(FFN(a))), with trained-size adapter weights."""
    torch.manual_seed(0)
    model = build("houlsby_adapters", VEC, width=8, depth=1, num_heads=2).to(device)
    with torch.no_grad():
        for p in model.layers.parameters():
            if p.requires_grad:
                p.normal_()
    layer, x = model.layers[0], torch.randn(3, 12, device=device)
    h = model.tokenizer(x)
    for t in VEC.tasks:
        attended = layer.attention(h, h, h, need_weights=False)[0]
        a = layer.attention_norms[t](h + by_hand(layer.attention_adapters[t], attended))
        out = layer.feed_forward_norms[t](a + by_hand(layer.feed_forward_adapters[t], layer.feed_forward(a)))
        torch.testing.assert_close(model(x)[t], model.heads[t](out))


def test_bottleneck_parameter_count(n_params):
    d, m = 16, 4
    assert n_params(Adapter(d, m)) == 2 * m * d + d + m
    w, depth, bottleneck = 8, 3, 2
    model = build("houlsby_adapters", VEC, width=w, depth=depth, bottleneck=bottleneck)
    adapters = depth * 2 * (2 * bottleneck * w + w + bottleneck)  # two per layer
    norms = depth * 2 * 2 * w  # two layer norms per layer, scale and shift
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == adapters + norms + heads[t]


def test_only_adapters_norms_and_heads_get_gradient_when_frozen(device, params_with_grad):
    torch.manual_seed(0)
    model = build("houlsby_adapters", VEC, width=8, num_heads=2).to(device)
    assert model.shared_parameters() and all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["b"].square().sum())
    specific_b = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("b"))}
    assert touched == specific_b  # every adapter, norm and head weight of b, nothing else
    assert all(".b." in n or n.startswith("heads.b.") for n in touched)


def test_unfrozen_backbone_is_shared(device, params_with_grad):
    torch.manual_seed(0)
    model = build("houlsby_adapters", VEC, width=8, num_heads=2, freeze_backbone=False).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].sum())
    assert {"tokenizer.embed.weight", "layers.1.feed_forward.2.weight", "layers.0.attention.in_proj_weight"} <= touched
    assert type(model) is HoulsbyAdapters and model.name == "houlsby_adapters"


def test_vectors_are_cut_into_contiguous_zero_padded_chunks():
    tokenizer = Tokenizer((10,), width=3, num_tokens=4)  # 10 features -> 4 tokens of 3, 2 zeros of padding
    assert (tokenizer.chunk, tokenizer.length) == (3, 4)
    x = torch.arange(20.0).view(2, 10)
    chunks = torch.cat([x, torch.zeros(2, 2)], dim=1).view(2, 4, 3)
    expected = chunks @ tokenizer.embed.weight.T + tokenizer.embed.bias + tokenizer.positions
    torch.testing.assert_close(tokenizer(x), expected)


def test_patch_size_is_the_largest_that_leaves_at_least_four_patches():
    sizes = ((8, 8), (16, 4), (8, 4), (4, 4), (4, 6), (2, 2), (3, 5))
    assert [patch_size_for(h, w) for h, w in sizes] == [4, 4, 2, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="too small"):
        patch_size_for(1, 3)  # 3 pixels: fewer than 4 patches at any size


def test_pooled_head_reads_the_mean_token():
    torch.manual_seed(0)
    head = TokenHead(4, 3, Tokenizer((12,), 4), dense=False)
    tokens = torch.randn(2, 5, 4)
    torch.testing.assert_close(head(tokens), tokens.mean(dim=1) @ head.linear.weight.T + head.linear.bias)


def test_each_patch_token_predicts_its_own_pixels():
    torch.manual_seed(0)
    tokenizer = Tokenizer((2, 16, 4), 4)  # a column of four 4 x 4 patches
    head = TokenHead(4, 3, tokenizer, dense=True)
    assert (tokenizer.patch, tokenizer.grid) == (4, (4, 1))
    tokens = torch.randn(2, 4, 4)
    out = head(tokens)  # (B, 3, 16, 4)
    per_token = (tokens @ head.linear.weight.T + head.linear.bias).view(2, 4, 3, 4, 4)  # channel, row, column
    for k in range(4):  # token k fills the k-th patch from the top, and only it
        torch.testing.assert_close(out[:, :, 4 * k: 4 * k + 4], per_token[:, k])


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("houlsby_adapters", device)
    first, last = short_training("houlsby_adapters", dense, device, steps=25)
    assert last < 0.8 * first


def test_adapter_weights_are_a_normal_truncated_at_two_std_on_both_sides():
    """Truncated N(0, s^2) on [-2s, 2s]: its std is about 0.88 s (a uniform on that range would give 1.15 s)."""
    torch.manual_seed(0)
    s = 1e-2
    adapter = Adapter(200, 100, init_scale=s)
    for weight in (adapter.down.weight, adapter.up.weight):
        w = weight.detach()
        assert w.min() >= -2 * s and w.max() <= 2 * s
        assert w.min() < -1.9 * s and w.max() > 1.9 * s  # both tails reach the cut
        assert abs(w.std().item() / s - 0.88) < 0.03
        assert abs(w.mean().item()) < 0.02 * s


def test_the_models_init_scale_reaches_every_adapter_and_the_default_bottleneck_is_a_quarter_width():
    torch.manual_seed(0)
    model = build("houlsby_adapters", VEC, width=32, depth=1, init_scale=0.05)
    layer = model.layers[0]
    for adapters in (layer.attention_adapters, layer.feed_forward_adapters):
        weights = torch.cat([a.down.weight.detach().flatten() for a in adapters.values()])
        assert weights.abs().max() <= 0.1 and weights.abs().max() > 0.05  # cut at 2 x 0.05, not at 2e-3
        assert adapters["a"].down.out_features == 8  # d / 4
    small = build("houlsby_adapters", VEC, width=4, depth=1, num_heads=2)
    assert small.layers[0].attention_adapters["a"].down.out_features == 1
