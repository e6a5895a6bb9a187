"""Unified-IO: one seq2seq model, shared vocabulary, the task named only by its prompt."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.registry import Problem
from reference_impls.architectures.unified_io import Block, UnifiedIO
from reference_impls.architectures.unified_io_2 import UnifiedIO2

from .conftest import layer_norm_by_hand

VECTOR = Problem(("a", "b"), (12,), {"a": 2, "b": 1})
DENSE = Problem(("seg", "depth"), (2, 4, 4), {"seg": 2, "depth": 1}, dense=True)


def build(device, problem=VECTOR, **kw):
    torch.manual_seed(0)
    return UnifiedIO.from_problem(problem, width=16, num_heads=2, num_tokens=4, **kw).to(device)


def test_task_is_conveyed_only_by_prompt_tokens(device):
    model = build(device)
    assert all(list(model.task_specific_parameters(t)) == [] for t in VECTOR.tasks)
    assert len(model.shared_parameters()) == len(list(model.parameters()))
    x = torch.randn(3, 12, device=device)
    out = model(x)
    assert not torch.allclose(out["a"][:, :1], out["b"])  # different prompts, different answers
    # Same prompt text for both tasks: the answers coincide exactly (same weights throughout).
    torch.manual_seed(0)
    twin = UnifiedIO.from_problem(VECTOR, width=16, num_heads=2, num_tokens=4,
                                  prompts={"a": "estimate depth", "b": "estimate depth"}).to(device)
    same = twin(x)
    torch.testing.assert_close(same["a"][:, :1], same["b"])
    # The prompt tokens are rows of the one embedding table shared with the answer tokens.
    assert model.prompt("a").max() < model.bin_start <= model.image_start == model.vocab_size


def test_teacher_forced_decoding_is_causal(device):
    model = build(device)
    x = torch.randn(2, 12, device=device)
    targets = model.bin_start + torch.tensor([[3, 7], [1, 0]], device=device)
    logits = model.teacher_forced_logits(x, "a", targets)
    assert logits.shape == (2, 2, model.vocab_size)
    changed = targets.clone()
    changed[:, 1] += 5  # the last token is never an input: nothing may change
    torch.testing.assert_close(model.teacher_forced_logits(x, "a", changed), logits)
    changed = targets.clone()
    changed[:, 0] += 5  # token 0 feeds position 1 only
    new = model.teacher_forced_logits(x, "a", changed)
    torch.testing.assert_close(new[:, 0], logits[:, 0])
    assert not torch.allclose(new[:, 1], logits[:, 1])


def test_greedy_generation_agrees_with_teacher_forcing(device):
    model = build(device, problem=DENSE)
    x = torch.randn(2, 2, 4, 4, device=device)
    tokens, step_logits = model.generate(x, "seg")
    assert tokens.shape == (2, 4) and ((tokens >= model.image_start) & (tokens < model.vocab_size)).all()
    torch.testing.assert_close(model.teacher_forced_logits(x, "seg", tokens), step_logits, atol=1e-5, rtol=1e-4)


def test_soft_decoding_reads_expected_bin_value(device):
    model = build(device)
    x = torch.randn(3, 12, device=device)
    any_targets = torch.full((3, 1), model.bin_start, device=device)
    first = model.teacher_forced_logits(x, "b", any_targets)[:, 0, model.bin_start:model.image_start]
    expected = torch.softmax(first, -1) @ model.bin_centres
    torch.testing.assert_close(model(x)["b"][:, 0], expected)


def test_soft_decoding_feeds_back_the_expected_token_embedding(device):
    model = build(device)
    x = torch.randn(3, 12, device=device)
    memory, (lo, hi) = model.encode_prompted(x, model.prompt("a")), model.target_range()
    inputs = model.embedding.weight[1].expand(3, 1, -1)  # BOS
    values = []
    for _ in range(2):  # task a answers with 2 tokens
        p = torch.softmax(model.run_decoder(inputs, memory)[:, -1, lo:hi], -1)
        values.append(p @ model.bin_centres)
        inputs = torch.cat([inputs, (p @ model.embedding.weight[lo:hi])[:, None]], dim=1)
    torch.testing.assert_close(model(x)["a"], torch.stack(values, 1))


def test_answers_round_trip_through_the_shared_vocabulary(device):
    model = build(device)
    y = torch.rand(5, 2, device=device) * 6 - 3
    tokens = model.tokenize_targets("a", y)
    values = model.bin_centres[tokens - model.bin_start]
    half_bin = (model.bin_centres[1] - model.bin_centres[0]) / 2
    assert ((values - y).abs() <= half_bin + 1e-6).all()
    dense = build(device, problem=DENSE)
    codes = torch.tensor([[0, 5, 9, 63]], device=device)  # 4 patches of 2 x 2 pixels x 2 channels
    image = dense.detokenize("seg", dense.codebook[codes])
    assert image.shape == (1, 2, 4, 4)
    assert torch.equal(dense.tokenize_targets("seg", image), dense.image_start + codes)
    # depth (1 channel) reads the first channel of the same shared detokeniser
    torch.testing.assert_close(dense.detokenize("depth", dense.codebook[codes]), image[:, :1])


def test_cross_entropy_training_learns_to_generate_answers(device):
    model = build(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, generator=g).to(device)
    targets = {"a": x[:, :2].clamp(-3, 3), "b": -x[:, 2:3].clamp(-3, 3)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(x, targets).item()
    for _ in range(40):
        opt.zero_grad()
        loss = model.loss(x, targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    for t in VECTOR.tasks:
        assert torch.equal(model.generate(x, t)[0], model.tokenize_targets(t, targets[t]))


def test_regression_through_soft_decoding_trains(device, fit):
    model = build(device)
    x = torch.randn(8, 12, device=device)
    target = {"a": x[:, :2], "b": x[:, 2:3] - x[:, 3:4]}
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target), 40, 1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_unified_io_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("unified_io", device)
    model = UnifiedIO.from_problem(VECTOR).to(device)
    assert model(torch.randn(2, 12, device=device))["a"].shape == (2, 2)


def test_the_decoder_reads_the_layer_normalised_encoder_output(device):
    """A pre-LN encoder (T5's, Unified-IO 2's ``encoder_norm``) ends in a LayerNorm; without it the
    cross-attention keys and values were read off the raw, growing residual stream."""
    model = build(device)
    x = torch.randn(3, 12, device=device)
    prompt = model.prompt("a")
    h = torch.cat([(model.embedding(prompt) + model.prompt_positions[: len(prompt)]).expand(3, -1, -1),
                   model.inputs(x)], dim=1)
    for block in model.encoder:
        h = block(h)
    memory = model.encode_prompted(x, prompt)
    torch.testing.assert_close(memory, torch.nn.functional.layer_norm(h, (16,), model.encoder_norm.weight,
                                                                       model.encoder_norm.bias))
    # unit-affine at initialisation: every encoder state has mean 0 and variance 1 over its features
    torch.testing.assert_close(memory.mean(-1), torch.zeros(memory.shape[:2], device=device), atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.var(-1, unbiased=False), torch.ones(memory.shape[:2], device=device),
                               atol=1e-3, rtol=0)


def _attention(attn, x, memory, mask=None):
    """Multi-head attention by hand: per head softmax(q k^T / sqrt(head dim)) v, then the out map."""
    b, n, d = x.shape
    heads, hd = attn.num_heads, d // attn.num_heads
    k, v = (memory @ attn.key_value.weight.T + attn.key_value.bias).split(d, dim=-1)
    q = x @ attn.query.weight.T + attn.query.bias
    split = [t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v)]
    logits = split[0] @ split[1].transpose(-1, -2) / hd**0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    mixed = (torch.softmax(logits, dim=-1) @ split[2]).transpose(1, 2).reshape(b, n, d)
    return mixed @ attn.out.weight.T + attn.out.bias




def _randomise_norms(model):
    with torch.no_grad():  # distinct affine norms, so that a skipped or swapped norm shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def test_decoder_by_hand(device):
    """Decoder inputs plus learned absolute positions; per block pre-LN causal self-attention,
    pre-LN cross-attention to the encoder states, pre-LN GELU MLP of twice the width; then the
    final norm and the logits over the whole vocabulary."""
    model = build(device)
    _randomise_norms(model)
    g = torch.Generator().manual_seed(0)
    inputs, memory = torch.randn(2, 2, 16, generator=g).to(device), torch.randn(2, 5, 16, generator=g).to(device)
    causal = torch.ones(2, 2, dtype=torch.bool, device=device).tril()
    with torch.no_grad():
        h = inputs + model.target_positions  # answers of at most 2 tokens
        for block in model.decoder:
            normed = layer_norm_by_hand(h, block.norm1)
            h = h + _attention(block.self_attention, normed, normed, causal)
            h = h + _attention(block.cross_attention, layer_norm_by_hand(h, block.norm_cross), memory)
            first, second = block.mlp[0], block.mlp[2]
            assert first.weight.shape == (32, 16)
            h = h + torch.nn.functional.gelu(layer_norm_by_hand(h, block.norm2) @ first.weight.T + first.bias) @ second.weight.T \
                + second.bias
        want = layer_norm_by_hand(h, model.final_norm) @ model.lm_head.weight.T + model.lm_head.bias
        torch.testing.assert_close(model.run_decoder(inputs, memory), want)


def test_loss_is_the_summed_token_cross_entropy_by_hand(device):
    model = build(device)
    x = torch.randn(3, 12, device=device)
    targets = {"a": torch.randn(3, 2, device=device), "b": torch.randn(3, 1, device=device)}
    with torch.no_grad():
        total = 0.0
        for t, y in targets.items():
            tokens = model.tokenize_targets(t, y)
            logp = torch.log_softmax(model.teacher_forced_logits(x, t, tokens), dim=-1)
            total = total - logp.gather(-1, tokens[..., None]).mean()
        torch.testing.assert_close(model.loss(x, targets), total)


def test_value_bins_by_hand():
    """32 bins evenly spread over [-4, 4] by default; a value goes to its nearest bin, ends included."""
    model = build("cpu")
    centres = torch.tensor([-4 + 8 * k / 31 for k in range(32)])
    torch.testing.assert_close(model.bin_centres, centres)
    y = torch.tensor([[-10.0, 10.0], [3.9, -3.9], [0.1, -0.1]])
    want = torch.tensor([[0, 31], [31, 0], [16, 15]])
    assert torch.equal(model.tokenize_targets("a", y), model.bin_start + want)


def test_a_dense_task_with_fewer_channels_is_coded_with_zeros_in_the_rest(device):
    """Depth (1 channel) reads as [depth; 0]; each 2 x 2 patch takes the nearest codebook entry
    in Euclidean distance."""
    model = build(device, problem=DENSE)
    depth = torch.randn(2, 1, 4, 4, device=device)
    padded = torch.cat([depth, torch.zeros_like(depth)], dim=1)
    patches = torch.nn.functional.pixel_unshuffle(padded, 2).flatten(2).transpose(1, 2)  # (B, 4, 8)
    nearest = ((patches[:, :, None] - model.codebook) ** 2).sum(-1).argmin(-1)
    assert torch.equal(model.tokenize_targets("depth", depth), model.image_start + nearest)
    assert torch.equal(model.tokenize_targets("seg", padded), model.image_start + nearest)


DENSE_12x8 = Problem(("seg", "depth"), (2, 12, 8), {"seg": 2, "depth": 1}, dense=True)


@pytest.mark.parametrize("kind, problem", [("unified_io", VECTOR), ("unified_io", DENSE_12x8),
                                           ("unified_io_2", VECTOR), ("unified_io_2", DENSE_12x8),
                                           ("florence_2", VECTOR)],
                         ids=["uio-vector", "uio-dense", "uio2-vector", "uio2-dense", "florence2-vector"])
def test_cached_decoding_equals_rerunning_the_whole_prefix(device, kind, problem):
    """Decoding keeps each block's earlier keys and values instead of rerunning the decoder
    over the whole prefix at every step (``cache=False``: ``run_decoder``, checked by hand in
    test_decoder_by_hand, over all inputs so far): the soft answers, their gradients, the
    greedy tokens and their step logits are those of the rerun (float64; 12 x 8 images give 6
    answer tokens of 2 x 2 patches, with 2D rotary angles in Unified-IO 2; three blocks)."""
    torch.manual_seed(0)
    model = registry.get(kind).from_problem(problem, width=16, num_heads=2, num_tokens=4, depth=3)
    model = model.to(device=device, dtype=torch.float64)
    x = torch.randn(3, *problem.input_shape, device=device, dtype=torch.float64)
    task = problem.tasks[0]
    soft = model.soft_decode(x, task, cache=False)
    assert soft.shape[1] == model.target_length(task) > 1
    weights = torch.randn_like(soft)
    want = torch.autograd.grad((soft * weights).sum(), list(model.parameters()), allow_unused=True)
    cached = model.soft_decode(x, task)
    torch.testing.assert_close(cached, soft, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((cached * weights).sum(), list(model.parameters()), allow_unused=True)
    for name, g, w in zip([n for n, _ in model.named_parameters()], got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
    tokens, step_logits = model.generate(x, task, cache=False)
    got_tokens, got_logits = model.generate(x, task)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, step_logits, rtol=1e-12, atol=1e-12)


def test_vocabulary_is_pad_bos_words_bins_then_codes_and_num_tokens_cuts_the_input():
    """[pad, bos] + sorted prompt words + num_bins bins (+ codebook_size codes, dense only); a
    task missing from out_dims answers one value."""
    torch.manual_seed(0)
    model = UnifiedIO(("a", "b"), (24,), {"a": 2}, dim=8, num_heads=2, num_bins=5, num_tokens=6)
    # default prompts "predict a", "predict b": three words, ids 2, 3, 4 in sorted order
    assert model.words == {"a": 2, "b": 3, "predict": 4}
    assert (model.bin_start, model.image_start, model.vocab_size) == (5, 10, 10)
    assert model.embed_input(torch.randn(2, 24)).shape == (2, 6, 8)  # 24 features in 6 tokens of 4
    out = model(torch.randn(2, 24))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 1)
    dense = UnifiedIO(("s",), (2, 4, 4), {"s": 2}, dense=True, dim=8, num_heads=2, num_bins=5, codebook_size=7)
    assert (dense.bin_start, dense.image_start, dense.vocab_size) == (4, 9, 16)  # words: predict, s


def test_cross_attention_ignores_the_query_angles_when_the_memory_has_none():
    """Block.forward: only with memory_angles does cross-attention rotate its queries and keys."""
    torch.manual_seed(0)
    block = Block(8, 2, cross=True)
    h, memory = torch.randn(2, 1, 8), torch.randn(2, 3, 8)
    angles = torch.rand(1, 2) * 3
    normed = block.norm1(h)
    h1 = h + block.self_attention(normed, normed, None, angles, angles)
    h2 = h1 + block.cross_attention(block.norm_cross(h1), memory)
    expected = h2 + block.mlp(block.norm2(h2))
    torch.testing.assert_close(block(h, memory, angles=angles), expected)
    torch.testing.assert_close(block.step(h, [], memory, angles), expected)


def test_qk_norm_reaches_every_attention_of_encoder_and_decoder():
    """Unified-IO 2 normalises queries and keys in self- and cross-attention alike."""
    torch.manual_seed(0)
    model = UnifiedIO2.from_problem(VECTOR, width=16, num_heads=2, num_tokens=4)
    attentions = [b.self_attention for b in (*model.encoder, *model.decoder)]
    attentions += [b.cross_attention for b in model.decoder]
    assert len(attentions) == 3 * len(model.encoder)
    for attention in attentions:
        assert isinstance(attention.q_norm, torch.nn.LayerNorm) and isinstance(attention.k_norm, torch.nn.LayerNorm)
