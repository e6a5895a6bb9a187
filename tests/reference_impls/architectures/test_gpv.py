"""GPV-1: boxes from the detector, relevance from co-attention with the task text, answers as words."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.gpv import GPV
from reference_impls.architectures.registry import Problem

from .conftest import layer_norm_by_hand

IMAGE = Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1})


def make(device="cpu", **kw):
    torch.manual_seed(0)
    return GPV.from_problem(IMAGE, width=8, num_heads=2, num_regions=4, **kw).to(device)


def test_no_task_heads_boxes_ignore_the_task_and_relevance_reads_it(device):
    model = make(device)
    assert all(list(model.task_specific_parameters(t)) == [] for t in model.tasks)
    assert len(model.shared_parameters()) == len(list(model.parameters()))
    x = torch.randn(2, 2, 8, 8, device=device)
    a, b = model.answer(x, "a"), model.answer(x, "b")
    assert a["boxes"].shape == (2, 4, 4) and a["relevance"].shape == (2, 4, 2)
    assert ((a["boxes"] > 0) & (a["boxes"] < 1)).all()
    torch.testing.assert_close(a["boxes"], b["boxes"])  # the detector does not see the query
    assert not torch.allclose(a["relevance"], b["relevance"])  # the relevance does
    torch.manual_seed(0)  # the same text for both tasks: same relevance, same first-step word scores
    twin = GPV.from_problem(IMAGE, width=8, num_heads=2, num_regions=4,
                            prompts={"a": "find the dog", "b": "find the dog"}).to(device)
    a, b = twin.answer(x, "a"), twin.answer(x, "b")
    torch.testing.assert_close(a["relevance"], b["relevance"])
    torch.testing.assert_close(a["word_scores"], b["word_scores"])


def test_task_outputs_are_the_scores_of_its_own_words_in_one_vocabulary(device):
    model = make(device)
    x = torch.randn(2, 2, 8, 8, device=device)
    out = model(x)
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 1)
    assert model.vocab_embed.shape[0] == 1 + 3 + 1  # __cls__, a's three words, b's word
    for t, words in (("a", slice(1, 4)), ("b", slice(4, 5))):
        torch.testing.assert_close(out[t], model.answer(x, t)["word_scores"][:, 0, words])
    # Word scores are dot products with the transformed frozen word vectors.
    states = torch.randn(2, 3, 8, device=device)
    expected = states @ (model.vocab_embed @ model.answer_transform.weight.T + model.answer_transform.bias).T
    torch.testing.assert_close(model.word_scores(states), expected)
    assert not model.vocab_embed.requires_grad


def test_relevance_conditioning_adds_the_expected_relevance_token(device):
    model = make(device)
    vision = torch.randn(2, 4, 8, device=device)
    logits = torch.randn(2, 4, 2, device=device)
    p = torch.softmax(logits, -1)
    expected = vision + p[..., :1] * model.relevance_tokens[0] + p[..., 1:] * model.relevance_tokens[1]
    torch.testing.assert_close(model.condition_on_relevance(vision, logits), expected)


def test_co_attention_updates_each_stream_from_the_other_only(device):
    model = make(device)
    layer = model.co_attention[0]
    text, vision = torch.randn(2, 3, 8, device=device), torch.randn(2, 4, 8, device=device)
    new_text, new_vision = layer(text, vision)
    changed = vision.clone()
    changed[:, 2] += 1.0
    text2, vision2 = layer(text, changed)
    # a region's update reads the text, not the other regions (no self-attention within a stream)
    torch.testing.assert_close(vision2[:, [0, 1, 3]], new_vision[:, [0, 1, 3]])
    assert not torch.allclose(text2, new_text)  # the text attends to every region


def test_teacher_forced_answers_are_causal_and_start_with_forwards_step(device):
    model = make(device)
    x = torch.randn(2, 2, 8, 8, device=device)
    answer = torch.tensor([[1, 2, 4], [3, 3, 1]], device=device)
    scores = model.answer(x, "a", answer)["word_scores"]
    assert scores.shape == (2, 4, 5)
    torch.testing.assert_close(scores[:, 0, 1:4], model(x)["a"])
    changed = answer.clone()
    changed[:, 1] = 4
    new = model.answer(x, "a", changed)["word_scores"]
    torch.testing.assert_close(new[:, :2], scores[:, :2])
    assert not torch.allclose(new[:, 2:], scores[:, 2:])
    with pytest.raises(ValueError, match="max_answer_length"):
        model.answer(x, "a", torch.ones(2, 8, dtype=torch.long, device=device))


def test_trains_and_refuses_dense_problems(device, fit):
    torch.manual_seed(0)
    model = GPV.from_problem(Problem(("a", "b"), (12,), {"a": 3, "b": 1}), width=8, num_heads=2,
                             num_regions=4, num_tokens=4, co_attention_depth=1, decoder_depth=1).to(device)
    x = torch.randn(8, 12, device=device)
    target = {"a": x[:, :3], "b": x[:, 3:4] - x[:, 4:5]}
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target), 30, 1e-2)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="dense"):
        GPV.from_problem(Problem(("a",), (2, 8, 8), {"a": 1}, dense=True))


def test_detector_region_features_pass_detrs_final_decoder_layernorm(device):
    # DETR's decoder ends with a LayerNorm of its own (decoder_norm in the transformer GPV-1 uses),
    # after the last post-LN layer: shifting that layer's LayerNorm bias must not shift the regions.
    model = make(device)
    with torch.no_grad():
        model.detector.decoder.layers[-1].norm3.bias.fill_(1.0)
    regions, _, _ = model.detector(torch.randn(2, 2, 8, 8, device=device))
    assert regions.mean(-1).abs().max().item() < 1e-4


def _linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)




def _stream_update_by_hand(update, own, other, num_heads):
    """LN(h + W a) with a = multi-head softmax(q k^T / sqrt(d_head)) v, then LN(h + W_2 GELU(W_1 h))."""
    att = update.attention
    heads = [slice(i * att.head_dim, (i + 1) * att.head_dim) for i in range(num_heads)]
    q, k, v = _linear(own, att.query), _linear(other, att.key), _linear(other, att.value)
    a = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / att.head_dim ** 0.5, -1) @ v[..., s]
                   for s in heads], -1)
    h = layer_norm_by_hand(own + _linear(a, update.attention_out), update.attention_norm)
    first, second = update.feed_forward[0], update.feed_forward[2]
    return layer_norm_by_hand(h + _linear(torch.nn.functional.gelu(_linear(h, first)), second), update.norm)


def test_each_stream_update_is_residual_layernormed_attention_then_feed_forward():
    model = make().double()
    layer = model.co_attention[0]
    text, vision = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    new_text, new_vision = layer(text, vision)
    torch.testing.assert_close(new_text, _stream_update_by_hand(layer.text, text, vision, 2))
    torch.testing.assert_close(new_vision, _stream_update_by_hand(layer.vision, vision, text, 2))


def test_answer_decodes_from_relevance_conditioned_regions_and_text_starting_at_word_zero():
    # relevance = DETR's 2 logits + a linear map of the co-attended region; the decoder's memory is
    # [regions + sum_c p_c rho_c; text], and the first input word is the vocabulary's word 0 (__cls__).
    model = make().double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    features, _, detector_logits = model.detector(x)
    for t in model.tasks:
        text, vision = model.co_attend(features, t)
        relevance = detector_logits + _linear(vision, model.relevance_predictor)
        p = torch.softmax(relevance, -1)
        regions = vision + p[..., :1] * model.relevance_tokens[0] + p[..., 1:] * model.relevance_tokens[1]
        expected = model.decode(torch.cat([regions, text], 1), torch.zeros(2, 1, dtype=torch.long))
        out = model.answer(x, t)
        torch.testing.assert_close(out["relevance"], relevance)
        torch.testing.assert_close(out["word_scores"], expected)


def test_decoder_inputs_are_a_second_linear_map_of_the_frozen_word_vectors():
    model = make().double()
    memory = torch.randn(2, 5, 8, dtype=torch.float64)
    words = torch.tensor([[0, 2, 4], [0, 1, 1]])
    inputs = _linear(model.vocab_embed[words], model.answer_input_transform)
    causal = torch.full((3, 3), float("-inf"), dtype=torch.float64).triu(1)
    states = model.text_decoder(inputs, memory, tgt_mask=causal)
    expected = states @ _linear(model.vocab_embed, model.answer_transform).T
    torch.testing.assert_close(model.decode(memory, words), expected)


def test_the_query_words_are_embedded_by_a_frozen_table():
    model = make()
    assert "query_table" in dict(model.named_buffers())
    assert all("query_table" not in n for n, _ in model.named_parameters())


def test_boxes_are_detrs_three_layer_mlp_of_the_regions_and_a_box_loss_trains_the_detector(device):
    """boxes = sigmoid(W3 ReLU(W2 ReLU(W1 r + b1) + b2) + b3) of every region feature r, written out
    from the weights; a box loss sends gradient through r into DETR's decoder, encoder and queries."""
    model = make(device).double()
    x = torch.randn(2, 2, 8, 8, device=device, dtype=torch.float64)
    regions, boxes, _ = model.detector(x)
    (l1, _, l2, _, l3) = model.detector.box_embed
    hidden = torch.relu(torch.relu(regions @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)
    torch.testing.assert_close(boxes, torch.sigmoid(hidden @ l3.weight.T + l3.bias), rtol=1e-12, atol=1e-12)
    model.zero_grad(set_to_none=True)
    model.answer(x, "a")["boxes"].square().sum().backward()
    for part in (model.detector.queries, *model.detector.decoder.parameters(), *model.detector.encoder.parameters()):
        assert part.grad is not None
    assert model.detector.queries.grad.abs().sum() > 0


def test_default_constructor_works_and_a_task_missing_from_out_dims_gets_one_word():
    # the signature's defaults must fit together (dim splits over num_heads); a task left out of
    # out_dims answers with a single word, i.e. a scalar output
    torch.manual_seed(0)
    model = GPV(("a", "b"), (12,), {"a": 3})
    out = model(torch.randn(2, 12))
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 1)
    assert model.vocab_embed.shape[0] == 1 + 3 + 1


@pytest.mark.parametrize("bad", [dict(dim=0), dict(co_attention_depth=0)])
def test_refuses_a_zero_width_or_no_co_attention_layer(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be at least 1"):
        GPV(("a",), (12,), {"a": 1}, **bad)


def test_the_seed_alone_fixes_the_frozen_word_tables():
    # the frozen query and answer word vectors come from the model's own seeded generator, not
    # from the global random state
    tables = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = GPV(("a", "b"), (12,), {"a": 2, "b": 1}, dim=8, num_heads=2, seed=5)
        tables.append((model.query_table, model.vocab_embed))
    torch.testing.assert_close(tables[0], tables[1])


def test_an_answer_may_fill_max_answer_length_with_its_cls_word():
    # [__cls__; answer] of exactly max_answer_length words is accepted; one more is refused
    model = make(max_answer_length=4)
    x = torch.randn(2, 2, 8, 8)
    assert model.answer(x, "a", torch.ones(2, 3, dtype=torch.long))["word_scores"].shape == (2, 4, 5)
    with pytest.raises(ValueError, match="max_answer_length"):
        model.answer(x, "a", torch.ones(2, 4, dtype=torch.long))


def test_num_tokens_sets_how_many_tokens_the_detector_reads_from_a_vector():
    # a 12-feature vector in 4 tokens: 4 chunks of 3 features
    torch.manual_seed(0)
    model = GPV(("a",), (12,), {"a": 1}, dim=8, num_heads=2, num_tokens=4)
    assert model.detector.tokens(torch.randn(2, 12)).shape == (2, 4, 8)
