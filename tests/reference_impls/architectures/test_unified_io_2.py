"""Unified-IO 2: 2D/1D rotary positions and QK normalisation on top of Unified-IO."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.registry import Problem
from reference_impls.architectures.unified_io import Attention, UnifiedIO
from reference_impls.architectures.unified_io_2 import UnifiedIO2, rotary_1d, rotary_2d

DENSE = Problem(("seg", "depth"), (2, 8, 8), {"seg": 2, "depth": 1}, dense=True)
VECTOR = Problem(("a", "b"), (12,), {"a": 2, "b": 1})


def build(device, cls=UnifiedIO2, problem=DENSE):
    torch.manual_seed(0)
    return cls.from_problem(problem, width=16, num_heads=2, num_tokens=4).to(device)


def attention_calls(model, run):
    """Call ``run()``; every attention module's calls, by module name, as dicts of its arguments."""
    seen = {n: [] for n, m in model.named_modules() if isinstance(m, Attention)}
    hooks = [m.register_forward_pre_hook(
        lambda module, args, kwargs, n=n: seen[n].append(dict(zip(("x", "memory", "mask", "q_angles", "k_angles"), args), **kwargs)),
        with_kwargs=True) for n, m in model.named_modules() if n in seen]
    run()
    for hook in hooks:
        hook.remove()
    return seen


def encoder_logits(model, x):
    """First encoder block's self-attention logits (B, heads, N, N)."""
    prompt = model.prompt("seg")
    words = model.embedding(prompt) + model.prompt_positions[: len(prompt)]
    h = torch.cat([words.expand(x.shape[0], -1, -1), model.inputs(x)], dim=1)
    block = model.encoder[0]
    normed = block.norm1(h)
    angles = model.encoder_angles(len(prompt))
    return block.self_attention.logits(normed, normed, angles, angles)[0], len(prompt)


def test_no_absolute_positions_only_rotations(device):
    model = build(device)
    names = [n for n, _ in model.named_parameters()]
    assert not any("position" in n for n in names)
    assert all(model.get_buffer(b).abs().sum() == 0 for b in ("prompt_positions", "target_positions", "inputs.positions"))
    angles = rotary_2d((4, 4), 8, device)  # row (0..3) drives pairs 0-1, column pairs 2-3
    assert angles.shape == (16, 4)
    torch.testing.assert_close(angles[5], torch.tensor([1.0, 0.01, 1.0, 0.01], device=device))
    torch.testing.assert_close(angles[6, :2], angles[5, :2])  # same row


def test_image_attention_depends_only_on_2d_offset(device):
    model = build(device, problem=Problem(("seg",), (2, 16, 16), {"seg": 1}, dense=True))  # 4 x 4 patches
    x = torch.ones(1, 2, 16, 16, device=device)  # identical patches: only positions differ
    logits, p = encoder_logits(model, x)
    patch = logits[0, :, p:, p:].reshape(2, 4, 4, 4, 4)  # (heads, row_q, col_q, row_k, col_k)
    for dr, dc in ((0, 1), (1, 0), (1, -1), (2, 2)):
        pairs = [patch[:, r, c, r + dr, c + dc] for r in range(4) for c in range(4)
                 if 0 <= r + dr < 4 and 0 <= c + dc < 4]
        for other in pairs[1:]:
            torch.testing.assert_close(other, pairs[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(patch[:, 0, 0, 0, 1], patch[:, 0, 0, 1, 0])  # rows and columns differ
    # end of a row to the start of the next is one step in raster order but (1, -3) on the grid
    assert not torch.allclose(patch[:, 0, 3, 1, 0], patch[:, 0, 0, 0, 1])


def test_which_tokens_get_which_angles(device):
    """Prompt text 1D; image patches 2D in the encoder and image-code answers 2D in the decoder;
    vector chunks continue the prompt's 1D positions and numeric answers count from 0."""
    image = build(device, problem=Problem(("seg",), (2, 16, 16), {"seg": 1}, dense=True))
    d, grid = image.head_dim, image.inputs.grid
    text = rotary_1d(torch.arange(3, device=device), d)
    torch.testing.assert_close(image.encoder_angles(3), torch.cat([text, rotary_2d(grid, d, device)]))
    torch.testing.assert_close(image.decoder_angles(5), rotary_2d(grid, d, device)[:5])
    vector = build(device, problem=VECTOR)
    n = vector.inputs.length
    torch.testing.assert_close(vector.encoder_angles(3), rotary_1d(torch.arange(3 + n, device=device), d))
    torch.testing.assert_close(vector.decoder_angles(2), rotary_1d(torch.arange(2, device=device), d))


def test_qk_normalisation_bounds_logits_and_ignores_scale(device):
    model = build(device)
    x = torch.randn(2, 2, 8, 8, device=device)
    logits, _ = encoder_logits(model, x)
    attention = model.encoder[0].self_attention
    with torch.no_grad():
        attention.query.weight.mul_(1e3), attention.query.bias.mul_(1e3)
        attention.key_value.weight[:16].mul_(1e3), attention.key_value.bias[:16].mul_(1e3)
    scaled, _ = encoder_logits(model, x)
    torch.testing.assert_close(scaled, logits, atol=1e-3, rtol=1e-3)
    # Unit-affine LayerNorm: |q.k| / sqrt(d) <= ||q|| ||k|| / sqrt(d) = sqrt(d).
    assert logits.abs().max() <= attention.head_dim**0.5 + 1e-4
    plain = build(device, UnifiedIO)  # Unified-IO: logits grow with the projections
    assert isinstance(plain.encoder[0].self_attention.q_norm, torch.nn.Identity)


def test_still_unified_io_prompted_and_causal(device):
    model = build(device)
    assert all(list(model.task_specific_parameters(t)) == [] for t in DENSE.tasks)
    x = torch.randn(2, 2, 8, 8, device=device)
    tokens, step_logits = model.generate(x, "depth")
    torch.testing.assert_close(model.teacher_forced_logits(x, "depth", tokens), step_logits, atol=1e-5, rtol=1e-4)
    vector = build(device, problem=VECTOR)
    targets = vector.bin_start + torch.tensor([[3, 7]], device=device)
    y = torch.randn(1, 12, device=device)
    base = vector.teacher_forced_logits(y, "a", targets)
    torch.testing.assert_close(vector.teacher_forced_logits(y, "a", targets + torch.tensor([[0, 4]], device=device)), base)


def test_trains(device, fit):
    model = build(device, problem=VECTOR)
    x = torch.randn(8, 12, device=device)
    target = {"a": x[:, :2], "b": x[:, 2:3] - x[:, 3:4]}
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target), 40, 1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_unified_io_2_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("unified_io_2", device)


def test_cross_attention_rotates_decoder_queries_and_encoder_keys(device):
    """As in the official decoder (allenai/unified-io-2, network.py): its cross-attention turns the
    queries by the answer's angles and the keys by the encoder's, in every decoding route."""
    model = build(device, problem=Problem(("seg",), (2, 16, 16), {"seg": 1}, dense=True))  # 4 x 4 patches
    x = torch.randn(2, 2, 16, 16, device=device)
    answer = model.image_start + torch.zeros(2, 16, dtype=torch.long, device=device)
    seen = attention_calls(model, lambda: (model.teacher_forced_logits(x, "seg", answer), model.generate(x, "seg"), model(x)))
    seen = seen["decoder.0.cross_attention"]
    encoder_angles, answer_angles = model.encoder_angles(len(model.prompt("seg"))), model.decoder_angles(16)
    # teacher forcing reads all 16 answer positions at once; each greedy and each soft decoding
    # step reads one, and turns its query by that position's angles
    expected = [answer_angles] + 2 * [answer_angles[i:i + 1] for i in range(16)]
    assert len(seen) == len(expected)
    for call, q_angles in zip(seen, expected):
        assert call.get("q_angles") is not None and call.get("k_angles") is not None
        torch.testing.assert_close(call["q_angles"], q_angles)
        torch.testing.assert_close(call["k_angles"], encoder_angles)


def test_every_attention_layer_rotates_its_queries_and_keys(device):
    """Rotary positions replace absolute ones in every layer, not just the first: each of three
    encoder and three decoder blocks turns its self-attention by its own stream's angles, and
    each decoder block's cross-attention queries by the answer's angles, keys by the encoder's."""
    torch.manual_seed(0)
    model = UnifiedIO2.from_problem(Problem(("seg",), (2, 16, 16), {"seg": 1}, dense=True),
                                    width=16, num_heads=2, num_tokens=4, depth=3).to(device)
    x = torch.randn(1, 2, 16, 16, device=device)
    answer = model.image_start + torch.zeros(1, 5, dtype=torch.long, device=device)
    seen = attention_calls(model, lambda: model.teacher_forced_logits(x, "seg", answer))
    encoder, decoder = model.encoder_angles(len(model.prompt("seg"))), model.decoder_angles(5)
    expected = {f"encoder.{i}.self_attention": (encoder, encoder) for i in range(3)}
    expected |= {f"decoder.{i}.self_attention": (decoder, decoder) for i in range(3)}
    expected |= {f"decoder.{i}.cross_attention": (decoder, encoder) for i in range(3)}
    assert set(seen) == set(expected)
    for name, (q_angles, k_angles) in expected.items():
        (call,) = seen[name]
        assert call.get("q_angles") is not None and call.get("k_angles") is not None, name
        torch.testing.assert_close(call["q_angles"], q_angles)
        torch.testing.assert_close(call["k_angles"], k_angles)


def test_head_dimension_not_divisible_by_four_is_refused():
    """2D rotary splits each head's feature pairs between row and column: head_dim 6 (3 pairs) is
    refused, head_dim 4 accepted."""
    with pytest.raises(ValueError, match="divisible by 4"):
        UnifiedIO2.from_problem(DENSE, width=12, num_heads=2, num_tokens=4)
    UnifiedIO2.from_problem(DENSE, width=8, num_heads=2, num_tokens=4)



def test_rotary_frequencies_use_base_10000_and_a_one_layer_model_builds():
    """RoPE's standard base: position p turns pair i by p * 10000^(-2i / d); d = 8 gives frequencies
    1, 1/10, 1/100, 1/1000. The head-width check also works for a model with a single layer."""
    torch.testing.assert_close(rotary_1d(torch.tensor([0, 1, 1000]), 8),
                               torch.tensor([[0.0, 0, 0, 0], [1.0, 0.1, 0.01, 0.001], [1000.0, 100, 10, 1]]),
                               rtol=1e-5, atol=0)
    UnifiedIO2.from_problem(DENSE, width=8, num_heads=2, num_tokens=4, depth=1)
