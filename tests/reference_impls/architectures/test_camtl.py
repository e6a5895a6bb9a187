"""CA-MTL: conditioning is the only difference between tasks; z = 0 is the plain network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.camtl import CALayer, CAMTL, ConditionalAttention, ConditionalLayerNorm, FiLM

from .conftest import assert_mlps_have_a_gelu

TASKS = ("mnli", "sst")


def build(device, **kw):
    torch.manual_seed(0)
    return CAMTL(TASKS, {"mnli": 3, "sst": 2}, seq_len=6, vocab_size=15, d_model=16,
                 num_heads=2, task_embedding_dim=4, attention_blocks=2, **kw).to(device)


def test_neutral_conditioning_is_plain_layer_norm(device):
    torch.manual_seed(0)
    cln = ConditionalLayerNorm(8, cond_dim=3).to(device)
    with torch.no_grad():
        cln.weight.uniform_(0.5, 1.5)
        cln.bias.normal_()
    plain = torch.nn.LayerNorm(8).to(device)
    plain.load_state_dict({"weight": cln.weight.detach(), "bias": cln.bias.detach()})
    h = torch.randn(2, 5, 8, device=device)
    torch.testing.assert_close(cln(h, torch.zeros(3, device=device)), plain(h))
    # Non-neutral z: gamma(z) = gamma_0 (1 + W_g z), beta(z) = beta_0 + W_b z, by hand.
    z = torch.randn(3, device=device)
    gb = cln.film.generator.weight @ z
    expected = cln.weight * (1 + gb[:8]) * F.layer_norm(h, (8,)) + cln.bias + gb[8:]
    torch.testing.assert_close(cln(h, z), expected)
    assert not torch.allclose(cln(h, z), plain(h))


def test_conditional_attention_matches_formula_and_is_block_diagonal(device):
    torch.manual_seed(0)
    attn = ConditionalAttention(8, num_heads=2, seq_len=6, blocks=3, cond_dim=4).to(device)
    with torch.no_grad():
        attn.bias_base.normal_()
    z = torch.randn(4, device=device)
    m = attn.score_bias(z)
    block = torch.block_diag(*[torch.ones(2, 2)] * 3).to(device)
    assert (m[block == 0] == 0).all() and (m[block == 1] != 0).all()
    gamma, beta = (attn.bias_film.generator.weight @ z).chunk(2)
    torch.testing.assert_close(m, ((1 + gamma) * attn.bias_base + beta) * block)
    # Full attention by hand, head by head.
    h = torch.randn(1, 6, 8, device=device)
    q, k, v = attn.qkv(h)[0].split(8, dim=-1)
    heads = []
    for i in range(2):
        sl = slice(4 * i, 4 * i + 4)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(4) + m
        heads.append(torch.softmax(s, -1) @ v[:, sl])
    expected = attn.out(torch.cat(heads, -1))
    torch.testing.assert_close(attn(h, z)[0], expected)


def test_tasks_differ_only_through_conditioning(device):
    model = build(device)
    ids = torch.randint(0, 15, (3, 6), device=device)
    model.heads["sst"] = torch.nn.Linear(16, 3).to(device)
    with torch.no_grad():
        model.heads["sst"].load_state_dict(model.heads["mnli"].state_dict())
        out = model(ids)
        assert not torch.allclose(out["mnli"], out["sst"])  # different z, different output
        model.task_embeddings["sst"].copy_(model.task_embeddings["mnli"])
        out = model(ids)
    torch.testing.assert_close(out["mnli"], out["sst"])


def test_alignment_is_identity_at_neutral_z(device):
    model = build(device)
    ids = torch.randint(0, 15, (2, 6), device=device)
    zero = torch.zeros(4, device=device)
    torch.testing.assert_close(model.aligned_embeddings(ids, zero), model.tokens(ids) + model.positions)


def test_gradients_reach_shared_weights_and_own_conditioning_only(device):
    model = build(device)
    ids = torch.randint(0, 15, (3, 6), device=device)
    model(ids)["mnli"].sum().backward()
    assert model.task_embeddings["mnli"].grad.abs().sum() > 0
    assert model.task_embeddings["sst"].grad is None
    assert all(p.grad is None for p in model.heads["sst"].parameters())
    shared = model.shared_parameters()
    assert all(p.grad is not None for p in shared)
    assert model.layers[0].attention.bias_film.generator.weight.grad.abs().sum() > 0
    assert model.alignment_film.generator.weight.grad.abs().sum() > 0
    assert len(list(model.task_specific_parameters("sst"))) == 3  # z_t, head weight, head bias


def test_trains_two_tasks_on_vectors(device, fit):
    torch.manual_seed(0)
    model = CAMTL(("a", "b"), {"a": 2, "b": 2}, seq_len=4, in_features=1, d_model=16,
                  num_heads=2, task_embedding_dim=4).to(device)
    x = torch.randn(32, 4, device=device)
    y = {"a": (x[:, 0] > 0).long(), "b": (x[:, 0] < 0).long()}  # opposite labels
    losses = fit(model, x, lambda out: sum(F.cross_entropy(out[t], y[t]) for t in y), steps=60, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_camtl_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("camtl", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_alignment_and_cls_read_by_hand_at_nonzero_z(device):
    model = build(device)
    with torch.no_grad():
        model.alignment.add_(torch.randn_like(model.alignment))  # R no longer symmetric
    ids = torch.randint(0, 15, (2, 6), device=device)
    z = model.task_embeddings["sst"]
    gamma, beta = (model.alignment_film.generator.weight @ z).chunk(2)
    rotation = (1 + gamma) * model.alignment + beta  # R(z) = FiLM(R | z)
    x = model.tokens(ids) + model.positions
    torch.testing.assert_close(model.aligned_embeddings(ids, z), x @ rotation.T)
    h = x @ rotation.T
    for layer in model.layers:
        h = layer(h, z)
    torch.testing.assert_close(model(ids)["sst"], model.heads["sst"](h[:, 0]))


def test_conditional_bottleneck_reads_the_filmed_state_by_hand(device):
    """h + Up(Down(FiLM(h | z))): the adapter sees (1 + gamma(z)) h + beta(z), not h."""
    torch.manual_seed(0)
    layer = CALayer(8, num_heads=2, seq_len=4, blocks=2, cond_dim=3, bottleneck=True).to(device)
    torch.nn.init.normal_(layer.adapter_film.generator.weight)  # a FiLM far from identity
    h0, z = torch.randn(2, 4, 8, device=device), torch.randn(3, device=device)
    h = layer.norm1(h0 + layer.attention(h0, z), z)
    gamma, beta = (layer.adapter_film.generator.weight @ z).chunk(2)
    expected = layer.norm2(h + layer.ff(h) + layer.adapter((1 + gamma) * h + beta), z)
    torch.testing.assert_close(layer(h0, z), expected)
    unfilmed = layer.norm2(h + layer.ff(h) + layer.adapter(h), z)
    assert not torch.allclose(layer(h0, z), unfilmed, atol=1e-3)


def test_conditional_bottleneck_is_down_then_up_with_no_nonlinearity(device):
    """Up(Down(.)) as in the formula and the official ConditionalBottleNeck: no activation between."""
    torch.manual_seed(0)
    layer = CALayer(8, num_heads=2, seq_len=4, blocks=2, cond_dim=3, bottleneck=True).to(device)
    down, up = layer.adapter[0], layer.adapter[-1]
    x = 3 * torch.randn(2, 4, 8, device=device)  # negative values would be bent by any activation
    expected = (x @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer.adapter(x), expected)


def test_default_model_has_a_conditional_bottleneck_in_every_layer(device):
    """The conditional bottleneck is one of CA-MTL's modules, so it is on unless switched off."""
    model = CAMTL(TASKS, {"mnli": 3, "sst": 2}, seq_len=4, vocab_size=10, d_model=8, num_heads=2)
    assert all(layer.adapter is not None for layer in model.layers)
    assert all(layer.adapter is None for layer in build(device, bottleneck=False).layers)


def test_score_bias_film_has_its_own_shift_per_column(device):
    """With A = 0, M(z) = beta(z) masked: one shift per key position, the same for every query row."""
    torch.manual_seed(0)
    attn = ConditionalAttention(8, num_heads=2, seq_len=6, blocks=2, cond_dim=4).to(device)
    m = attn.score_bias(torch.randn(4, device=device))
    block = m[:3, :3]  # first diagonal block
    torch.testing.assert_close(block, block[:1].expand(3, 3))  # rows repeat
    assert len(set(block[0].tolist())) == 3  # columns differ: not one scalar for the whole block


def test_film_generators_start_small_so_every_task_starts_near_the_plain_network():
    """The generators are drawn from N(0, 0.02^2): gamma(z) and beta(z) start close to 0 for any z."""
    from reference_impls.architectures.camtl import FiLM

    torch.manual_seed(0)
    weight = FiLM(64, 128).generator.weight.detach()  # 16384 draws: the std's own error is about 1e-4
    assert abs(weight.mean().item()) < 1e-3
    assert abs(weight.std().item() - 0.02) < 1e-3


def test_film_and_conditional_layer_norm_condition_each_row_on_its_own_z():
    """A batch of conditioning vectors (B, cond) styles row i of x with z_i alone: gamma and beta are
    the two halves of the generator's *last* axis, not of the batch."""
    torch.manual_seed(0)
    film, cln = FiLM(3, 5), ConditionalLayerNorm(5, cond_dim=3)
    x, z = torch.randn(4, 5), torch.randn(4, 3)
    torch.testing.assert_close(film(x, z), torch.stack([film(x[i], z[i]) for i in range(4)]))
    torch.testing.assert_close(cln(x, z), torch.stack([cln(x[i], z[i]) for i in range(4)]))


def test_conditional_layer_norm_uses_its_own_eps():
    """At z = 0 CLN is LayerNorm with the eps it was given (a large eps makes the difference visible)."""
    torch.manual_seed(0)
    cln = ConditionalLayerNorm(8, cond_dim=3, eps=0.5)
    h = 0.3 * torch.randn(2, 5, 8)
    torch.testing.assert_close(cln(h, torch.zeros(3)), torch.nn.LayerNorm(8, eps=0.5)(h))


def test_score_bias_blocks_are_full_learned_matrices():
    """Each block A_n of M(z) is an (L/N x L/N) matrix: a query row can get its own bias, so A has L * L entries."""
    torch.manual_seed(0)
    attn = ConditionalAttention(8, num_heads=2, seq_len=6, blocks=2, cond_dim=4)
    assert attn.bias_base.numel() == 6 * 6
    with torch.no_grad():
        attn.bias_base.normal_()
    m = attn.score_bias(torch.randn(4))
    assert not torch.allclose(m[0, :3], m[1, :3])  # two query rows of one block differ


def test_feed_forward_is_a_gelu_mlp():
    """The transformer (BERT) feed-forward W2 gelu(W1 h + b1) + b2: without the GELU the block is linear."""
    torch.manual_seed(0)
    assert_mlps_have_a_gelu(layer.ff for layer in build("cpu").layers)


def test_documented_task_embedding_width_is_8():
    """The module docstring: the task embedding is 8 wide here (d wide in the official code)."""
    model = CAMTL(TASKS, {"mnli": 3, "sst": 2}, seq_len=4, vocab_size=10, d_model=8, num_heads=2)
    assert all(z.shape == (8,) for z in model.task_embeddings.values())


def test_bad_widths_and_sequence_lengths_are_refused():
    """d_model = 0 is refused when built; token ids of the wrong length are refused with a ValueError."""
    with pytest.raises(ValueError, match="d_model must be at least 1, got 0"):
        CAMTL(TASKS, {"mnli": 3, "sst": 2}, seq_len=6, vocab_size=15, d_model=0, num_heads=2)
    with pytest.raises(ValueError, match="length 6, got 5"):
        build("cpu")(torch.randint(0, 15, (2, 5)))


def test_every_position_has_its_own_embedding():
    """Learned positions are (L, d): the same token at two positions embeds differently (at z = 0 as well)."""
    model = build("cpu")
    assert model.positions.shape == (6, 16)
    h = model.aligned_embeddings(torch.full((1, 6), 3), torch.zeros(4))[0]
    assert all(not torch.allclose(h[i], h[j]) for i in range(6) for j in range(i))


def test_from_problem_width_is_the_model_width():
    from reference_impls.architectures import registry

    model = registry.build("camtl", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3}), width=8)
    assert model.alignment.shape == (8, 8) and model.heads["b"].in_features == 8
