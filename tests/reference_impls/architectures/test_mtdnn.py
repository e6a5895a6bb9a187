"""MT-DNN: the encoder is shared by every task, each output layer belongs to one task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.mtdnn import MTDNN

from .conftest import names_the_refusal

TASKS = ("sst", "sts", "qnli")
KINDS = {"sst": "classification", "sts": "regression", "qnli": "ranking"}


def build(device, **kw):
    torch.manual_seed(0)
    return MTDNN(TASKS, {"sst": 3}, KINDS, vocab_size=20, d_model=16, num_heads=2, **kw).to(device)


def test_output_layers_per_task_kind(device):
    model = build(device)
    ids = torch.randint(0, 20, (4, 7), device=device)
    seg = torch.zeros_like(ids)
    seg[:, 4:] = 1  # sentence pair: second segment
    out = model(ids, seg)
    assert out["sst"].shape == (4, 3) and out["sts"].shape == (4, 1) and out["qnli"].shape == (4,)
    z = model.encode(ids, seg)
    torch.testing.assert_close(model.decode(z)["sst"], z @ model.heads["sst"].weight.T + model.heads["sst"].bias)
    torch.testing.assert_close(model.decode(z)["qnli"], out["qnli"])
    # The segment embedding matters: the same tokens read as one sentence differ.
    assert not torch.allclose(model(ids)["sts"], out["sts"])


def test_encoder_shared_heads_specific(device):
    model = build(device)
    ids = torch.randint(0, 20, (4, 6), device=device)
    encoder_params = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    for task in TASKS:
        model.zero_grad(set_to_none=True)
        model(ids)[task].float().sum().backward()
        got = [p for p in encoder_params if p.grad is not None and p.grad.abs().sum() > 0]
        # Every encoder tensor (except the unused segment table) learns from every task.
        assert {id(p) for p in got} == {id(p) for n, p in model.named_parameters()
                                        if not n.startswith(("heads.", "segments."))}
        for other in TASKS:
            grads = [p.grad for p in model.heads[other].parameters()]
            assert all(g is not None for g in grads) == (other == task)
    specific = {id(p) for t in TASKS for p in model.task_specific_parameters(t)}
    assert specific == {id(p) for p in model.heads.parameters()}
    assert len(model.shared_parameters()) == len(encoder_params)


def test_ranking_loss_is_softmax_over_candidates():
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    positive = torch.tensor([0, 2])
    gamma = 3.0
    expected = -torch.stack([
        torch.log_softmax(gamma * scores[0], 0)[0],
        torch.log_softmax(gamma * scores[1], 0)[2],
    ]).mean()
    torch.testing.assert_close(MTDNN.ranking_loss(scores, positive, gamma), expected)


def test_vector_inputs_and_training(device, fit):
    torch.manual_seed(0)
    model = MTDNN(("a", "b"), {"a": 2, "b": 1}, {"a": "classification", "b": "regression"},
                  in_features=1, d_model=16, num_heads=2).to(device)
    x = torch.randn(32, 5, device=device)
    ya = (x[:, 0] > 0).long()
    yb = x[:, 1:2] * 2
    losses = fit(model, x, lambda out: F.cross_entropy(out["a"], ya) + F.mse_loss(out["b"], yb), steps=40, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0]


def test_rejects_ambiguous_inputs():
    with pytest.raises(ValueError):
        MTDNN(("a",), {"a": 2}, vocab_size=10, in_features=3)


def test_mtdnn_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("mtdnn", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_encode_reads_the_cls_position(device):
    model = build(device)
    ids = torch.randint(0, 20, (3, 6), device=device)
    hidden = model.encoder(model.embed(ids))
    torch.testing.assert_close(model.encode(ids), hidden[:, 0])
    torch.testing.assert_close(model(ids)["sst"], model.heads["sst"](hidden[:, 0]))


def test_lexicon_encoder_by_hand(device):
    """[CLS; token + segment] + position, with no LayerNorm on the sum; CLS gets position 0."""
    model = build(device)
    ids = torch.randint(0, 20, (2, 5), device=device)
    seg = torch.tensor([[0, 0, 1, 1, 1]] * 2, device=device)
    words = model.tokens(ids) + model.segments(seg)
    expected = torch.cat([model.cls.expand(2, 1, 16), words], 1) + model.positions.weight[:6]
    torch.testing.assert_close(model.embed(ids, seg), expected)


def test_encoder_is_post_norm_relu_width_two_by_hand(device):
    """Each layer: h = LN1(h + SelfAttn(h)); h = LN2(h + W2 relu(W1 h)), W1 of width 2 d; no final norm."""
    model = build(device, num_layers=3)
    assert len(model.encoder.layers) == 3
    with torch.no_grad():  # LayerNorms off identity, so an extra final norm would show
        for norm in (m for m in model.encoder.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    h = model.embed(torch.randint(0, 20, (2, 5), device=device))
    out = model.encoder(h)
    for layer in model.encoder.layers:
        assert layer.linear1.out_features == 2 * 16
        h = layer.norm1(h + layer.self_attn(h, h, h, need_weights=False)[0])
        h = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    torch.testing.assert_close(out, h)


def test_score_heads_are_linear_in_cls(device):
    """sim = w_t . x and Rel = w_t . x: a plain linear read of [CLS], no activation g."""
    model = build(device)
    z = torch.randn(4, 16, device=device) * 3
    out = model.decode(z)
    for task in ("sts", "qnli"):
        w, b = model.heads[task].weight, model.heads[task].bias
        expected = z @ w.T + b
        torch.testing.assert_close(out[task], expected.squeeze(-1) if task == "qnli" else expected)


def test_parameter_count():
    """Lexicon: V token rows, max_len + 1 positions ([CLS] and up to max_len tokens), two segments
    (sentence A and B), one [CLS] vector; per post-norm layer 8 d^2 + 11 d (attention 4 d^2 + 4 d,
    feed-forward of width 2d 4 d^2 + 3 d, two LayerNorms 4 d); one linear layer per task."""
    v, d, max_len, layers = 20, 16, 9, 2
    torch.manual_seed(0)
    model = MTDNN(TASKS, {"sst": 3}, KINDS, vocab_size=v, d_model=d, num_heads=2, max_len=max_len,
                  num_layers=layers)
    lexicon = v * d + (max_len + 1) * d + 2 * d + d
    encoder = layers * (8 * d * d + 11 * d)
    heads = {"sst": 3 * d + 3, "sts": d + 1, "qnli": d + 1}
    assert sum(p.numel() for p in model.shared_parameters()) == lexicon + encoder
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == heads[t]
    assert sum(p.numel() for p in model.parameters()) == lexicon + encoder + sum(heads.values())


@pytest.mark.parametrize(("argument", "value"), (("d_model", -4), ("max_len", 0)))
def test_refuses_a_non_positive_size_and_names_it(argument, value):
    """checks.require_positive: a width or length below 1 is a ValueError naming it when the model is
    built, not a negative tensor dimension (d_model = -4 splits evenly over 2 heads) or an IndexError
    at the first forward pass (max_len = 0 leaves a position table for [CLS] only)."""
    kwargs = {"d_model": 16, "max_len": 8, argument: value}
    with pytest.raises(ValueError) as error:
        MTDNN(TASKS, {"sst": 3}, KINDS, vocab_size=20, num_heads=2, **kwargs)
    assert names_the_refusal(error.value, argument, value)


def test_task_kinds_default_to_classification_and_are_checked():
    """Without task_kinds every task is a classification task with out_dims[t] logits, so each needs
    its out_dims; a kinds map must cover exactly the tasks, with known kinds only."""
    model = MTDNN(("a", "b"), {"a": 3, "b": 2}, vocab_size=10, d_model=8, num_heads=2)
    assert model.task_kinds == {"a": "classification", "b": "classification"}
    assert model(torch.randint(0, 10, (4, 5)))["a"].shape == (4, 3)
    with pytest.raises(ValueError):  # classification without a number of classes
        MTDNN(("a", "b"), {"a": 3}, vocab_size=10, d_model=8, num_heads=2)
    for kinds in ({"a": "regression"}, {"a": "regression", "b": "regresion"},
                  {"a": "regression", "b": "ranking", "c": "ranking"}):
        with pytest.raises(ValueError):
            MTDNN(("a", "b"), {"a": 3, "b": 2}, kinds, vocab_size=10, d_model=8, num_heads=2)


def test_ranking_task_has_one_score_whatever_out_dims_says(device):
    """Rel(Q, A) = w_t . x is one number per input, even where out_dims (e.g. a registry problem,
    which fills in every task) gives the task another width."""
    torch.manual_seed(0)
    model = MTDNN(("r", "c"), {"r": 3, "c": 2}, {"r": "ranking", "c": "classification"}, vocab_size=10,
                  d_model=8, num_heads=2).to(device)
    assert model.heads["r"].out_features == 1
    out = model(torch.randint(0, 10, (4, 5), device=device))
    assert out["r"].shape == (4,) and out["c"].shape == (4, 2)


def test_registry_width_is_d_model_and_long_vectors_fit():
    """build(..., width=w) makes a d_model = w encoder whose position table covers every entry of
    the vector (one token each) plus [CLS], also beyond the class default of 128 positions."""
    from reference_impls.architectures import registry

    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (150,), {"a": 1, "b": 2})
    model = registry.build("mtdnn", problem, width=8)
    assert model.cls.shape == (8,) and model.heads["b"].in_features == 8
    assert model.positions.num_embeddings == 151
    out = model(torch.randn(2, 150))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 2)


def test_ranking_loss_defaults_to_a_plain_softmax_cross_entropy():
    """gamma = 1 by default (the official RankCeCriterion has no such factor): -log softmax(scores)[positive]."""
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    positive = torch.tensor([0, 2])
    expected = -(torch.log_softmax(scores[0], 0)[0] + torch.log_softmax(scores[1], 0)[2]) / 2
    torch.testing.assert_close(MTDNN.ranking_loss(scores, positive), expected)
