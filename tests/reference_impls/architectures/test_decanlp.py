"""MQAN: coattention by hand; the multi-pointer-generator mixture is a distribution with the right limits."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.decanlp import MQAN, coattention, mix_pointer_generator
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VOCAB = 11


def text_model(device: torch.device) -> MQAN:
    torch.manual_seed(0)
    return MQAN(("qa",), vocab_size=VOCAB, dim=8).to(device)


def ids(device, *shape):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape))).to(device)


def test_coattention_by_hand(device):
    torch.manual_seed(0)
    c, q = torch.randn(1, 3, 4, device=device), torch.randn(1, 2, 4, device=device)
    proj = torch.nn.Linear(4, 4).to(device)
    sentinels = torch.randn(2, 4, device=device)
    with torch.no_grad():
        co_c, co_q = coattention(c, q, proj, sentinels)
        C = torch.cat([sentinels[:1], c[0]])  # context with its sentinel, (4, d)
        Q = torch.tanh(proj(torch.cat([sentinels[1:], q[0]])))  # (3, d)
    assert co_c.shape == (1, 3, 8) and co_q.shape == (1, 2, 8)
    A = [[float(C[i] @ Q[j]) for j in range(3)] for i in range(4)]
    A = torch.tensor(A, device=device)
    for i in range(1, 4):  # context position i-1
        a_q = torch.softmax(A[i], 0)  # over question positions
        q_sum = sum(a_q[j] * Q[j] for j in range(3))
        c_sums = [sum(torch.softmax(A[:, j], 0)[k] * C[k] for k in range(4)) for j in range(3)]
        second = sum(a_q[j] * c_sums[j] for j in range(3))
        torch.testing.assert_close(co_c[0, i - 1], torch.cat([second, q_sum]))
    for j in range(1, 3):  # question position j-1: [S_c^T Q_sum ; C_sum]
        a_c = torch.softmax(A[:, j], 0)  # over context positions
        c_sum = sum(a_c[i] * C[i] for i in range(4))
        q_sums = [sum(torch.softmax(A[i], 0)[k] * Q[k] for k in range(3)) for i in range(4)]
        second = sum(a_c[i] * q_sums[i] for i in range(4))
        torch.testing.assert_close(co_q[0, j - 1], torch.cat([second, c_sum]))


def test_compression_lstms_read_embedding_encoding_and_coattention(device):
    """Each side's compression BiLSTM reads [coattended; encoded; embedded] (paper and official code)."""
    model = text_model(device)
    context, question = ids(device, 2, 5), ids(device, 2, 3)
    emb_c, emb_q = model.words(context), model.words(question)
    with torch.no_grad():
        enc_c, enc_q = model.encoder(emb_c)[0], model.encoder(emb_q)[0]
        co_c, co_q = coattention(enc_c, enc_q, model.co_proj, model.sentinels)
        want_c = model.context_final(torch.cat([co_c, enc_c, emb_c], -1))[0]
        want_q = model.question_final(torch.cat([co_q, enc_q, emb_q], -1))[0]
        got_c, got_q = model.encode_pair(emb_c, emb_q)
    torch.testing.assert_close(got_c, want_c)
    torch.testing.assert_close(got_q, want_q)


def attend(pointer, h, states):
    """PointerAttention by hand: weights = softmax(h . states), tanh(W [h; weights states])."""
    w = torch.softmax(torch.einsum("bd,bnd->bn", h, states), dim=-1)
    read = torch.einsum("bn,bnd->bd", w, states)
    return torch.tanh(torch.cat([h, read], -1) @ pointer.out.weight.T + pointer.out.bias), w


def test_decoder_step_by_hand(device):
    """p_v from the context read, gamma from [h; c~; x_t], lambda from [h; q~; x_t] (official MQAN)."""
    model = text_model(device)
    context, question, answer = ids(device, 2, 5), ids(device, 2, 3), ids(device, 2, 2)
    enc_c, enc_q = model.encode_pair(model.words(context), model.words(question))
    steps = model.decode_steps(model.words(answer), enc_c, enc_q)
    h = c = torch.zeros(2, 8, device=device)
    for t in range(2):
        x_t = model.words(answer[:, t])
        h, c = model.decoder(x_t, (h, c))
        c_read, p_c = attend(model.context_attn, h, enc_c)
        q_read, p_q = attend(model.question_attn, h, enc_q)
        gamma = torch.sigmoid(model.vocab_switch(torch.cat([h, c_read, x_t], -1)))
        lam = torch.sigmoid(model.context_switch(torch.cat([h, q_read, x_t], -1)))
        torch.testing.assert_close(steps["p_vocab"][:, t], torch.softmax(model.generator(c_read), -1))
        torch.testing.assert_close(steps["p_context"][:, t], p_c)
        torch.testing.assert_close(steps["p_question"][:, t], p_q)
        torch.testing.assert_close(steps["gamma"][:, t], gamma)
        torch.testing.assert_close(steps["lam"][:, t], lam)


def test_repo_answer_is_the_expected_embedding_under_the_mixture(device):
    """gamma E_{p_v}[word] + (1 - gamma)(lambda E_{p_c}[context] + (1 - lambda) E_{p_q}[question])."""
    torch.manual_seed(0)
    model = build("decanlp", Problem(("a", "b"), (6,), {"a": 1, "b": 3}), width=8).to(device)
    x = torch.randn(4, 6, device=device)
    enc_c, enc_q = model.encode_pair(model.context_tokens(x), model.questions["b"].expand(4, -1, -1))
    d = model.decode_steps(model.answer_start.expand(4, 1, -1), enc_c, enc_q)
    g, lam = d["gamma"][:, 0], d["lam"][:, 0]
    assert (g - 0.5).abs().max() < 0.49 and (lam - 0.5).abs().max() < 0.49  # every source counts
    vocab = d["p_vocab"][:, 0] @ model.words.weight
    from_c = (d["p_context"][:, 0, :, None] * enc_c).sum(1)
    from_q = (d["p_question"][:, 0, :, None] * enc_q).sum(1)
    expected = g * vocab + (1 - g) * (lam * from_c + (1 - lam) * from_q)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](expected))


def test_mixture_is_a_distribution_with_repeated_words(device):
    model = text_model(device)
    context = torch.tensor([[3, 3, 5, 7, 3]], device=device)  # word 3 appears three times
    p = model.answer_probs(context, ids(device, 1, 4), ids(device, 1, 6))
    assert p.shape == (1, 6, VOCAB) and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 6, device=device))


def test_mixture_formula_by_hand(device):
    p_v = torch.tensor([[[0.5, 0.25, 0.25, 0.0]]], device=device)
    p_c = torch.tensor([[[0.5, 0.5]]], device=device)
    p_q = torch.tensor([[[1.0]]], device=device)
    g, lam = torch.full((1, 1, 1), 0.5, device=device), torch.full((1, 1, 1), 0.75, device=device)
    context_ids = torch.tensor([[1, 3]], device=device)
    question_ids = torch.tensor([[1]], device=device)
    p = mix_pointer_generator(p_v, p_c, p_q, g, lam, context_ids, question_ids)
    # word 1: 0.5*0.25 + 0.5*0.75*0.5 (context) + 0.5*0.25*1 (question)
    expected = torch.tensor([[[0.25, 0.125 + 0.1875 + 0.125, 0.125, 0.1875]]], device=device)
    torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("gamma_bias,lambda_bias,source", [(40.0, 0.0, "vocab"), (-40.0, 40.0, "context"),
                                                           (-40.0, -40.0, "question")])
def test_switch_limits(device, gamma_bias, lambda_bias, source):
    model = text_model(device)
    with torch.no_grad():
        for switch, bias in ((model.vocab_switch, gamma_bias), (model.context_switch, lambda_bias)):
            switch.weight.zero_()
            switch.bias.fill_(bias)
    context, question, answer = ids(device, 2, 5), ids(device, 2, 3), ids(device, 2, 4)
    p = model.answer_probs(context, question, answer)
    enc_c, enc_q = model.encode_pair(model.words(context), model.words(question))
    d = model.decode_steps(model.words(answer), enc_c, enc_q)
    if source == "vocab":
        torch.testing.assert_close(p, d["p_vocab"])
        return
    ids_, attn = (context, d["p_context"]) if source == "context" else (question, d["p_question"])
    absent = torch.ones(2, VOCAB, dtype=torch.bool, device=device).scatter(1, ids_, False)
    assert p[absent[:, None].expand_as(p)].abs().max() < 1e-6  # only words present in that source
    expected = torch.zeros_like(p).scatter_add(-1, ids_[:, None].expand(-1, 4, -1), attn)
    torch.testing.assert_close(p, expected)


def test_only_questions_and_heads_are_task_specific(device, params_with_grad):
    torch.manual_seed(0)
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 3})
    model = build("decanlp", problem, width=8).to(device)
    out = model(torch.randn(4, 6, device=device))
    assert out["a"].shape == (4, 1) and out["b"].shape == (4, 3)
    touched = params_with_grad(model, out["a"].sum())
    assert "questions.a" in touched and "questions.b" not in touched
    assert not any(n.startswith("heads.b") for n in touched)
    for shared in ("co_proj.weight", "sentinels", "vocab_switch.weight", "context_switch.weight", "words.weight"):
        assert shared in touched
    # Same question and head => same answer: the question is the task's whole identity.
    with torch.no_grad():
        model.questions["b"].copy_(model.questions["a"])
        model.heads["b"] = model.heads["a"]
        out = model(torch.randn(4, 6, device=device))
    torch.testing.assert_close(out["a"], out["b"])


def test_each_task_claims_exactly_its_question_and_head(device, split_by_task):
    """The question and the head are the only task-specific parts, and each is claimed by its task."""
    torch.manual_seed(0)
    model = build("decanlp", Problem(("a", "b"), (6,), {"a": 1, "b": 3}), width=8).to(device)
    split = split_by_task(model, torch.randn(4, 6, device=device))
    assert_each_task_owns_exactly(split, lambda t: {f"questions.{t}"} | names_under(model, f"heads.{t}."))


def test_trains_to_answer_by_copying(device, fit):
    """Answer = a context word: the copy pointer learns it (loss on the mixed distribution)."""
    model = text_model(device)
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, VOCAB, (16, 5), generator=g).to(device)
    question = torch.zeros(16, 2, dtype=torch.long, device=device)
    target = context[:, 2]  # "what is the third word?"
    start = torch.zeros(16, 1, dtype=torch.long, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        p = model.answer_probs(context, question, start)[:, 0]
        loss = -p.gather(1, target[:, None]).clamp_min(1e-9).log().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_builds_for_vectors_and_pooled_images_refuses_dense(device):
    for problem, x in ((Problem(("a", "b"), (5,), {"a": 2, "b": 1}), torch.randn(3, 5)),
                       (Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}), torch.randn(3, 2, 4, 4))):
        out = build("decanlp", problem).to(device)(x.to(device))
        assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)
    with pytest.raises(ValueError):
        build("decanlp", Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True))


def test_the_run_says_that_the_paper_trains_the_answer_tokens_with_an_anti_curriculum():
    """The harness trains forward's one-step readout; the note must name the paper's answer likelihood."""
    assert "answer_probs()" in MQAN.training_procedure and "anti-curriculum" in MQAN.training_procedure


def test_context_tokens_keep_the_input_order_by_hand(device):
    """A vector's i-th feature is the i-th context token (w x_i + b); an image's patches are the
    tokens in row-major order, each the patch convolution written out from the weights."""
    torch.manual_seed(0)
    model = build("decanlp", Problem(("a", "b"), (5,), {"a": 1, "b": 1}), width=8).double().to(device)
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    w, b = model.context_in.weight[:, 0], model.context_in.bias
    expected = torch.stack([x[:, i, None] * w + b for i in range(5)], dim=1)
    torch.testing.assert_close(model.context_tokens(x), expected, rtol=0, atol=1e-12)
    image = build("decanlp", Problem(("a", "b"), (2, 8, 8), {"a": 1, "b": 1}), width=8).double().to(device)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, device=device)
    conv, p = image.context_in, 4
    kernel = conv.weight.flatten(1)  # (d, C p p)
    patches = [x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten(1) for r in range(2) for c in range(2)]
    expected = torch.stack([patch @ kernel.T + conv.bias for patch in patches], dim=1)
    torch.testing.assert_close(image.context_tokens(x), expected, rtol=0, atol=1e-12)


def test_one_sentinel_per_side_and_unnamed_tasks_answer_one_number():
    """One learned sentinel row for the context and one for the question (docstring), both of
    which train; a task missing from ``out_dims`` gets width 1, as in a repo Problem."""
    torch.manual_seed(0)
    model = MQAN(("a", "b"), {"a": 3}, vocab_size=VOCAB, in_features=1, dim=8)
    assert model.sentinels.shape == (2, 8)
    model.answer_probs(ids("cpu", 2, 5), ids("cpu", 2, 3), ids("cpu", 2, 2)).log().mean().backward()
    assert (model.sentinels.grad.abs().sum(-1) > 0).all()
    out = model(torch.randn(2, 6))
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 1)


def test_from_problem_passes_width_and_options_and_patches_tile_the_whole_image():
    """``width`` and extra keywords reach the model; the patch size divides both image sides,
    so every pixel (here of an 8x6 image, 4 does not divide 6) reaches the answer."""
    vector = MQAN.from_problem(Problem(("a", "b"), (5,)), width=8, question_length=5)
    image = MQAN.from_problem(Problem(("a", "b"), (2, 8, 6)), width=6, question_length=2)
    assert vector.dim == 8 and vector.questions["a"].shape == (5, 8)
    assert image.dim == 6 and image.questions["a"].shape == (2, 6)
    x = torch.randn(1, 2, 8, 6, requires_grad=True)
    image(x)["a"].sum().backward()
    assert (x.grad.abs().sum(dim=(0, 1)) > 0).all()
