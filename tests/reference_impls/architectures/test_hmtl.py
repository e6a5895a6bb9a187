"""Hierarchical supervision: lower tasks ignore upper layers, upper tasks build on lower ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.hmtl import HierarchicalMTL

from .conftest import reached_by_no_other

TASKS = ("pos", "chunk", "entail")
OUT = {"pos": 5, "chunk": 4, "entail": 3}


def grads_of(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_low_task_does_not_depend_on_upper_layers(device):
    torch.manual_seed(0)
    model = HierarchicalMTL(TASKS, 6, OUT, hidden_dim=8).to(device)
    assert model.task_depths == {"pos": 1, "chunk": 2, "entail": 3}
    out = model(torch.randn(4, 6, device=device))
    assert {t: o.shape for t, o in out.items()} == {t: (4, OUT[t]) for t in TASKS}
    out["pos"].sum().backward()
    assert model.layers[0][0].weight.grad.abs().sum() > 0
    assert all(g is None for g in grads_of(model.layers[1]) + grads_of(model.layers[2]))


def test_upper_task_sees_lower_layers(device):
    torch.manual_seed(0)
    model = HierarchicalMTL(TASKS, 6, OUT, hidden_dim=8).to(device)
    model(torch.randn(4, 6, device=device))["entail"].sum().backward()
    for layer in model.layers:
        assert layer[0].weight.grad.abs().sum() > 0
    assert all(g is None for g in grads_of(model.heads["pos"]) + grads_of(model.heads["chunk"]))
    # The top layer serves only the top task: it is task-specific, the rest is shared.
    specific = {id(p) for p in model.task_specific_parameters("entail")}
    assert {id(p) for p in model.layers[2].parameters()} <= specific
    assert not {id(p) for p in model.layers[1].parameters()} & specific


def test_shared_layers_change_lower_and_upper_outputs_together(device):
    """Perturbing layer 1 moves every task; perturbing layer 3 moves only the top task."""
    torch.manual_seed(0)
    model = HierarchicalMTL(TASKS, 6, OUT, hidden_dim=8).to(device)
    x = torch.randn(4, 6, device=device)
    before = model(x)
    with torch.no_grad():
        model.layers[2][0].weight.add_(1.0)
    after = model(x)
    torch.testing.assert_close(after["pos"], before["pos"])
    torch.testing.assert_close(after["chunk"], before["chunk"])
    assert not torch.allclose(after["entail"], before["entail"])


def test_jmt_shortcuts_and_label_embeddings(device):
    torch.manual_seed(0)
    model = HierarchicalMTL(
        TASKS, 6, OUT, hidden_dim=8, shortcut=True, label_embedding_dim=3
    ).to(device)
    # Layer k > 1 reads [h_{k-1}; x; label embedding of the task at depth k-1].
    assert model.layers[1][0].in_features == 8 + 6 + 3
    assert set(model.label_embeddings) == {"pos", "chunk"}
    x = torch.randn(4, 6, device=device)
    model(x)["chunk"].sum().backward()
    # Label feed: the chunk loss trains the POS head and POS label embedding...
    assert model.heads["pos"].weight.grad.abs().sum() > 0
    assert model.label_embeddings["pos"].weight.grad.abs().sum() > 0
    # ...so the POS head is shared, not POS-specific.
    assert {id(p) for p in model.task_specific_parameters("pos")} == set()
    # Shortcut: with layer 1 silenced (constant output), chunk still depends on x.
    with torch.no_grad():
        model.layers[0][0].weight.zero_()
    a = model(x)["chunk"]
    b = model(x + 1.0)["chunk"]
    assert not torch.allclose(a, b)
    # Hand computation of layer 2's input for one batch.
    h1 = model.layers[0](x)
    pos = model.heads["pos"](h1)
    feed = torch.softmax(pos, -1) @ model.label_embeddings["pos"].weight.T
    h2 = model.layers[1](torch.cat([h1, x, feed], -1))
    torch.testing.assert_close(model(x)["chunk"], model.heads["chunk"](h2))


def test_bilstm_sequence_variant(device):
    torch.manual_seed(0)
    model = HierarchicalMTL(
        TASKS, 5, OUT, hidden_dim=8, cell="bilstm", shortcut=True, label_embedding_dim=2,
        sentence_tasks={"entail"},
    ).to(device)
    x = torch.randn(2, 7, 5, device=device)
    out = model(x)
    assert out["pos"].shape == (2, 7, 5) and out["entail"].shape == (2, 3)
    # Token-level tasks at lower depths never see later layers, even in sequence mode.
    out["pos"].sum().backward()
    assert all(g is None for g in grads_of(model.layers[1]))


def test_trains_on_a_toy_hierarchy(device):
    torch.manual_seed(0)
    x = torch.randn(64, 6, device=device)
    labels = {
        "pos": (x[:, 0] > 0).long(),
        "chunk": (x[:, 0] * x[:, 1] > 0).long(),
        "entail": ((x[:, 0] > 0) & (x[:, 2] > 0)).long(),
    }
    model = HierarchicalMTL(TASKS, 6, {t: 2 for t in TASKS}, hidden_dim=16, shortcut=True).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        out = model(x)
        loss = sum(F.cross_entropy(out[t], labels[t]) for t in TASKS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.6 * first


def test_rejects_bad_depths():
    with pytest.raises(ValueError):
        HierarchicalMTL(("a", "b"), 3, {"a": 1, "b": 1}, task_depths={"a": 1})


def test_hmtl_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("hmtl", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_sentence_task_is_max_pooled_over_time(device):
    torch.manual_seed(0)
    model = HierarchicalMTL(TASKS, 5, OUT, hidden_dim=8, cell="bilstm", sentence_tasks={"entail"}).to(device)
    x = torch.randn(2, 7, 5, device=device)
    h = x
    for layer in model.layers:
        h = layer(h)
    torch.testing.assert_close(model(x)["entail"], model.heads["entail"](h.max(dim=1).values))


def test_label_feeds_of_all_tasks_one_level_below_are_concatenated_in_task_order(device):
    """Two tasks at depth 1: layer 2 reads [h_1; softmax(y_pos) E_pos; softmax(y_ner) E_ner]."""
    torch.manual_seed(0)
    tasks, out = ("pos", "ner", "chunk"), {"pos": 5, "ner": 3, "chunk": 4}
    depths = {"pos": 1, "ner": 1, "chunk": 2}
    model = HierarchicalMTL(tasks, 6, out, task_depths=depths, hidden_dim=8, label_embedding_dim=2).to(device)
    assert model.layers[1][0].in_features == 8 + 2 * 2
    x = torch.randn(4, 6, device=device)
    h1 = model.layers[0](x)
    feeds = [torch.softmax(model.heads[t](h1), -1) @ model.label_embeddings[t].weight.T for t in ("pos", "ner")]
    h2 = model.layers[1](torch.cat([h1, *feeds], -1))
    torch.testing.assert_close(model(x)["chunk"], model.heads["chunk"](h2))


def test_sentence_level_label_feed_reaches_every_position(device):
    """A max-pooled task at depth 1 feeds the same label embedding to every token of layer 2."""
    torch.manual_seed(0)
    tasks, out = ("topic", "tag"), {"topic": 3, "tag": 4}
    model = HierarchicalMTL(tasks, 5, out, hidden_dim=8, cell="bilstm", label_embedding_dim=2,
                            sentence_tasks={"topic"}).to(device)
    x = torch.randn(2, 7, 5, device=device)
    h1 = model.layers[0](x)
    topic = model.heads["topic"](h1.max(dim=1).values)
    feed = (torch.softmax(topic, -1) @ model.label_embeddings["topic"].weight.T).unsqueeze(1).expand(-1, 7, -1)
    h2 = model.layers[1](torch.cat([h1, feed], -1))
    got = model(x)
    torch.testing.assert_close(got["topic"], topic)
    torch.testing.assert_close(got["tag"], model.heads["tag"](h2))


def test_a_vector_layer_is_a_relu_of_a_linear_map():
    from reference_impls.architectures import registry

    torch.manual_seed(0)
    model = registry.build("hmtl", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3}))
    for cell in model.layers:
        x = torch.randn(5, cell[0].in_features)
        torch.testing.assert_close(cell(x), F.relu(cell[0](x)))
        assert (cell(x) == 0).any()


def test_bilstm_layers_read_the_whole_sentence_both_ways_and_no_other_sentence():
    """A BiLSTM cell runs over time (dim 1 of (B, L, D)), forwards and backwards, one sentence per batch row."""
    torch.manual_seed(0)
    model = HierarchicalMTL(TASKS, 5, OUT, hidden_dim=8, cell="bilstm")
    x = torch.randn(2, 7, 5, requires_grad=True)
    first, last = model.layers[0](x)[0, [0, -1]]
    (from_first,) = torch.autograd.grad(first.sum(), x, retain_graph=True)
    (from_last,) = torch.autograd.grad(last.sum(), x)
    assert from_first[0, -1].abs().sum() > 0  # the backward direction reads the end of the sentence
    assert from_last[0, 0].abs().sum() > 0  # the forward direction reads its start
    assert from_first[1].abs().sum() == 0 and from_last[1].abs().sum() == 0  # never the other sentence


def test_any_positive_label_embedding_dim_turns_the_label_feed_on_and_a_negative_one_is_refused():
    """The docstring: JMT's label feed needs a positive ``label_embedding_dim`` (1 is positive), 0 is the
    plain stack; a negative width used to be read silently as 0 and is now refused like other bad sizes."""
    model = HierarchicalMTL(TASKS, 6, OUT, hidden_dim=8, label_embedding_dim=1)
    assert set(model.label_embeddings) == {"pos", "chunk"}
    assert model.layers[1][0].in_features == 8 + 1
    with pytest.raises(ValueError, match="label_embedding_dim must be at least 0, got -1"):
        HierarchicalMTL(TASKS, 6, OUT, hidden_dim=8, label_embedding_dim=-1)


def test_token_level_label_feed_is_a_softmax_over_classes_by_hand(device):
    """In sequence mode the label feed of a token-level task is softmax over its classes (last axis), per token."""
    torch.manual_seed(0)
    model = HierarchicalMTL(("pos", "chunk"), 5, {"pos": 4, "chunk": 3}, hidden_dim=8, cell="bilstm",
                            label_embedding_dim=2).to(device)
    x = torch.randn(2, 7, 5, device=device)
    h1 = model.layers[0](x)
    feed = torch.softmax(model.heads["pos"](h1), dim=-1) @ model.label_embeddings["pos"].weight.T
    h2 = model.layers[1](torch.cat([h1, feed], -1))
    torch.testing.assert_close(model(x)["chunk"], model.heads["chunk"](h2))


@pytest.mark.parametrize("depths, feed", [
    ({"pos": 1, "chunk": 2, "entail": 3}, 0),  # Søgaard & Goldberg: every head is its task's own
    ({"pos": 1, "chunk": 2, "entail": 3}, 2),  # JMT: a head that feeds labels upward is shared
    ({"pos": 1, "chunk": 1, "entail": 3}, 2),  # two tasks at one depth, a layer with no task of its own
    ({"pos": 1, "chunk": 2}, 2),  # pos's label embedding serves only chunk: it is chunk's own
])
def test_task_specific_parameters_are_exactly_those_no_other_task_reaches(split_by_task, depths, feed):
    torch.manual_seed(0)
    tasks = tuple(depths)
    model = HierarchicalMTL(tasks, 6, {t: OUT[t] for t in tasks}, task_depths=depths, hidden_dim=8,
                            shortcut=True, label_embedding_dim=feed)
    split = split_by_task(model, torch.randn(16, 6))
    for t in tasks:
        assert split[t][0] == reached_by_no_other(split, t), t
    assert any(split[t][0] for t in tasks)


def test_from_problem_passes_width_and_jmt_options_on():
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("hmtl", problem, width=8, shortcut=True, label_embedding_dim=2)
    assert model.layers[0][0].out_features == 8
    assert model.layers[1][0].in_features == 8 + 4 + 2  # [h_1; x; label feed of a]
