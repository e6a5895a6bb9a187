"""VTAGML: affinity-weighted task embeddings, block-diagonal task-adapted attention bias,
task-scaled norms and bottlenecks chained by skip connections, on a frozen encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.vtagml import VTAGML, TaskAdaptedAttentionBias, TaskScaledNorm

TASKS = ("seg", "depth", "normal")
OUT = {"seg": 3, "depth": 1, "normal": 3}


def make(device, dense=True, **kw):
    torch.manual_seed(0)
    problem = Problem(TASKS, (3, 8, 8), OUT, dense=dense)
    return VTAGML.from_problem(problem, width=12, num_heads=2, embed_dim=6, **kw).to(device)


def randomise(model):
    """Move the zero-initialised parts (TAA matrices, FiLM biases) away from zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "matrix" in name or "to_gamma_beta.bias" in name:
                p.normal_(0, 0.5)


def test_conditioning_is_the_affinity_weighted_average_of_task_embeddings(device):
    model = make(device)
    theta = {t: model.task_embeddings[t].detach() for t in TASKS}
    torch.testing.assert_close(model.conditioning("depth"), theta["depth"])  # identity affinity
    affinity = torch.tensor([[0.9, 0.7, 0.1], [0.6, 0.8, 0.4], [0.2, 0.5, 1.0]])
    model.set_task_affinity(affinity)
    # Column t weighs the embeddings for task t: R[j, t] says how much task j helps task t.
    expected = (0.9 * theta["seg"] + 0.6 * theta["depth"] + 0.2 * theta["normal"]) / 1.7
    torch.testing.assert_close(model.conditioning("seg"), expected)
    expected = (0.1 * theta["seg"] + 0.4 * theta["depth"] + 1.0 * theta["normal"]) / 1.5
    torch.testing.assert_close(model.conditioning("normal"), expected)


def test_affinity_decides_which_task_embeddings_reach_a_task(device):
    model = make(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    model(x)["seg"].square().sum().backward()
    reached = {t: model.task_embeddings[t].grad.abs().sum() > 0 for t in TASKS}
    assert reached == {"seg": True, "depth": False, "normal": False}
    model.zero_grad(set_to_none=True)
    model.set_task_affinity(torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    model(x)["seg"].square().sum().backward()
    reached = {t: model.task_embeddings[t].grad.abs().sum() > 0 for t in TASKS}
    assert reached == {"seg": True, "depth": True, "normal": False}  # depth now helps seg


def test_tasks_with_the_same_affinity_column_are_conditioned_alike(device):
    """Zero-shot transfer: a task is conditioned through its affinities to the others."""
    model = make(device, dense=False)
    randomise(model)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        model.heads["normal"].load_state_dict(model.heads["seg"].state_dict())
        out = model(x)
        assert not torch.allclose(out["normal"], out["seg"])
        model.set_task_affinity(torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 2.0], [0.0, 0.0, 0.0]]))
        out = model(x)
    torch.testing.assert_close(out["normal"], out["seg"])


def test_bad_affinity_is_refused(device):
    model = make(device)
    with pytest.raises(ValueError, match="3 x 3"):
        model.set_task_affinity(torch.eye(2))
    with pytest.raises(ValueError, match="non-negative"):
        model.set_task_affinity(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        model.set_task_affinity(-torch.eye(3))


def test_task_adapted_bias_is_block_diagonal_filmed_matrix(device):
    torch.manual_seed(0)
    taa = TaskAdaptedAttentionBias(tokens=10, blocks=4, cond_dim=5).to(device)  # m = ceil(10 / 4) = 3
    with torch.no_grad():
        taa.matrix.normal_()
        taa.film.to_gamma_beta.bias.normal_()
    cond = torch.randn(5, device=device)
    bias = taa(cond)
    gamma, beta = taa.film.to_gamma_beta(cond).chunk(2)
    filmed = (1 + gamma) * taa.matrix + beta  # (10, 3)
    expected = torch.zeros(10, 10, device=device)
    for start in range(0, 10, 3):  # row blocks 0-2, 3-5, 6-8 and 9, each on its own columns
        stop = min(start + 3, 10)
        expected[start:stop, start:stop] = filmed[start:stop, : stop - start]
    torch.testing.assert_close(bias.detach(), expected.detach())
    assert bias[0, 3] == 0 and bias[9, 8] == 0 and bias[4, 3] != 0


def test_task_scaled_norm_modulates_the_layer_norm_scale(device):
    torch.manual_seed(0)
    norm = TaskScaledNorm(6, 4).to(device)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        norm.modulation.to_gamma_beta.bias.normal_()
    h, cond = torch.randn(2, 5, 6, device=device), torch.randn(4, device=device)
    gamma, beta = norm.modulation.to_gamma_beta(cond).chunk(2)
    standardised = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(h, cond), standardised * ((1 + gamma) * norm.weight + beta) + norm.bias)


def test_forward_by_hand_taa_tsn_and_bottleneck_skips(device):
    """x += TAA(TSN1 x); x += FFN(TSN2 x); s_l = up(down(FiLM(W_e ω, x + s_{l-1}))); head(LN(s_L))."""
    model = make(device, dense=False, adapter_depth=3)
    randomise(model)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)

    def film(module, cond, h):
        gamma, beta = module.to_gamma_beta(cond).chunk(2, dim=-1)
        return (1 + gamma) * h + beta

    h0 = model.tokenizer(x)
    for block in model.frozen_blocks:
        h0 = block(h0)
    for t in TASKS:
        cond = model.task_embeddings[t]
        h, skip = h0, torch.zeros_like(h0)
        for layer in model.adapters:
            attn = layer.attention
            a = layer.norm1(h, cond)
            logits, v = attn.logits(a, a)
            probs = (logits + layer.attention_bias(cond)).softmax(-1)
            h = h + attn.out((probs @ v).transpose(1, 2).reshape(h.shape))
            h = h + layer.feed_forward(layer.norm2(h, cond))
            skip = layer.up(layer.down(film(layer.film, layer.embed_transform(cond), h + skip)))
        torch.testing.assert_close(out[t], model.heads[t](F.layer_norm(skip, (12,), model.norm.weight, model.norm.bias)))


def test_attention_logits_get_the_task_bias_on_every_head(device):
    model = make(device)
    randomise(model)
    layer = model.adapters[0]
    h = torch.randn(2, model.tokenizer.length, 12, device=device)
    bias = layer.attention_bias(model.conditioning("depth"))
    logits, v = layer.attention.logits(h, h)
    expected = layer.attention.out(((logits + bias).softmax(-1) @ v).transpose(1, 2).reshape(h.shape))
    torch.testing.assert_close(layer.attention(h, h, bias=bias), expected)
    assert not torch.allclose(layer.attention(h, h, bias=bias), layer.attention(h, h))
    assert logits.shape[1] == 2 and math.isclose(layer.attention.head_dim, 6)


def test_frozen_encoder_gets_no_gradient_and_adapters_do(device):
    model = make(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 3, 8, 8) and out["depth"].shape == (2, 1, 8, 8)
    sum(o.square().mean() for o in out.values()).backward()
    frozen = [*model.tokenizer.parameters(), *model.frozen_blocks.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    for name, p in model.adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_untrained_bottleneck_width_follows_the_code(device):
    model = make(device)
    assert model.adapters[0].down.out_features == 12 // 3
    assert make(device, bottleneck=2).adapters[0].down.out_features == 2
    with pytest.raises(ValueError, match="bottleneck must be at least 1, got 0"):
        make(device, bottleneck=0)
    with pytest.raises(ValueError, match="taa_blocks must be at least 1, got 0"):
        make(device, taa_blocks=0)


def test_trains(device, fit):
    model = make(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    target = {t: torch.randn(4, OUT[t], 8, 8, device=device) for t in TASKS}
    losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], target[t]) for t in TASKS), steps=25, lr=0.01)
    assert losses[-1] < 0.8 * losses[0]


def test_vtagml_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("vtagml", device)


def test_vectors_are_tokenised(device):
    model = build("vtagml", Problem(("a", "b"), (12,), {"a": 2, "b": 1})).to(device)
    out = model(torch.randn(3, 12, device=device))
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)


def test_taa_matrices_and_film_biases_start_at_zero(device):
    model = make(device)
    films = [m for m in model.modules() if m.__class__.__name__ == "FiLM"]
    assert len(films) == 2 * 4  # per adapter layer: two TSNs, the TAA bias, the bottleneck FiLM
    assert all(torch.count_nonzero(f.to_gamma_beta.bias) == 0 for f in films)
    assert all(torch.count_nonzero(layer.attention_bias.matrix) == 0 for layer in model.adapters)


def test_attention_logits_are_scaled_dot_products_per_head(device):
    model = make(device)
    attn = model.adapters[0].attention
    h = torch.randn(2, model.tokenizer.length, 12, device=device)
    logits, v = attn.logits(h, h)
    q = F.linear(h, attn.query.weight, attn.query.bias)
    k, values = F.linear(h, attn.key_value.weight, attn.key_value.bias).split(12, dim=-1)
    for head in range(2):
        cols = slice(6 * head, 6 * head + 6)
        torch.testing.assert_close(logits[:, head], q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(6))
        torch.testing.assert_close(v[:, head], values[..., cols])


def test_a_frozen_block_is_pre_norm_attention_then_pre_norm_feed_forward_both_residual():
    from reference_impls.architectures.vtagml import FrozenBlock

    torch.manual_seed(0)
    block, x = FrozenBlock(8, 2), torch.randn(2, 5, 8)
    with torch.no_grad():  # shifts, so that a norm left out shows
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    a = block.norm1(x)
    after_attention = x + block.attention(a, a)
    expected = after_attention + block.feed_forward(block.norm2(after_attention))
    torch.testing.assert_close(block(x), expected)


def test_frozen_depth_sets_the_number_of_frozen_blocks_and_depths_must_be_positive(device):
    """frozen_depth frozen blocks run before the adapters (each changes the output); zero frozen blocks or
    zero adapter layers are refused."""
    model = make(device, frozen_depth=2)
    assert len(model.frozen_blocks) == 2
    x = torch.randn(2, 3, 8, 8, device=device)
    before = model(x)["seg"]
    with torch.no_grad():
        model.frozen_blocks[1].feed_forward[-1].bias.add_(1.0)
    assert not torch.allclose(model(x)["seg"], before)
    for bad in ({"frozen_depth": 0}, {"adapter_depth": 0}):
        with pytest.raises(ValueError):
            make(device, **bad)


def test_bottleneck_is_a_third_of_the_width_but_at_least_one(device):
    """width // 3 as in the code, floored at 1: a width of 4 gives a bottleneck of 1."""
    torch.manual_seed(0)
    model = VTAGML.from_problem(Problem(TASKS, (3, 8, 8), OUT, dense=True), width=4, num_heads=2, embed_dim=6)
    assert model.adapters[0].down.out_features == 1


def test_num_tokens_sets_the_vector_tokenisation(device):
    model = build("vtagml", Problem(("a", "b"), (12,), {"a": 2, "b": 1}), num_tokens=4)
    assert model.tokenizer.length == 4 and model.adapters[0].attention_bias.tokens == 4
