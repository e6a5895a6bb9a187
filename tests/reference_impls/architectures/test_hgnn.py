"""HGNN: max-pooled task embeddings, intra-task locality, permutation equivariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.hgnn import HGNN

TASKS = ("school_a", "school_b", "school_c")


def build(device):
    torch.manual_seed(0)
    return HGNN(TASKS, 4, {t: 1 for t in TASKS}, hidden_dim=8).to(device)


def test_task_embedding_is_max_pooling_and_inter_task_attention(device):
    model = build(device)
    x = torch.randn(3, 5, 4, device=device)
    h = model.hierarchy(x)
    torch.testing.assert_close(h["task_embeddings"], h["points"].max(dim=1).values)
    e = h["task_embeddings"]
    adj = model.inter_task.adjacency(e)
    torch.testing.assert_close(adj.sum(-1), torch.ones(3, device=device))
    expected = torch.relu(model.inter_task.self_weight(e) + adj @ model.inter_task.neighbour_weight(e))
    torch.testing.assert_close(h["updated_task_embeddings"], expected)
    # Intra-task GNN by hand for task 1: its graph contains only its own points.
    z = model.encoder(x[1])
    a = torch.softmax(model.intra_task.query(z) @ model.intra_task.key(z).T / 8 ** 0.5, -1)
    torch.testing.assert_close(h["points"][1], torch.relu(model.intra_task.self_weight(z) + a @ model.intra_task.neighbour_weight(z)))


def test_task_t_predicts_from_its_points_and_its_own_updated_embedding(device):
    """y_i = head_t([h'_i ; e'_t]) with e'_t the inter-task GNN output of task t."""
    model = build(device)
    x = torch.randn(3, 5, 4, device=device)
    h = model.hierarchy(x)
    out = model(x)
    for i, t in enumerate(TASKS):
        context = h["updated_task_embeddings"][i].expand(5, -1)
        torch.testing.assert_close(out[t], model.heads[t](torch.cat([h["points"][i], context], -1)))


def test_registry_gives_a_task_without_a_width_one_output():
    """Problem.task_out_dims: a task the problem leaves without a width gets 1 (was a KeyError)."""
    from reference_impls.architectures import registry

    out = registry.build("hgnn", registry.Problem(("a", "b"), (4,), {"a": 2}))(torch.randn(3, 4))
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)


def test_other_tasks_reach_a_point_only_through_task_embeddings(device):
    model = build(device)
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    h = model.hierarchy(x)
    (g,) = torch.autograd.grad(h["points"][0].sum(), x, retain_graph=True)
    assert g[0].abs().sum() > 0 and g[1:].abs().sum() == 0  # intra-task level is task-local
    (g,) = torch.autograd.grad(model(x)["school_a"].sum(), x)
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0  # inter-task level shares knowledge


def test_permutation_equivariance_within_a_task(device):
    model = build(device)
    x = torch.randn(3, 6, 4, device=device)
    perm = torch.randperm(6, device=device)
    shuffled = x.clone()
    shuffled[1] = x[1, perm]
    a, b = model(x), model(shuffled)
    torch.testing.assert_close(b["school_b"], a["school_b"][perm])
    torch.testing.assert_close(b["school_a"], a["school_a"])  # task embedding is order-free
    torch.testing.assert_close(b["school_c"], a["school_c"])


def test_gradients_and_shared_batch_input(device):
    model = build(device)
    out = model(torch.randn(7, 4, device=device))  # same batch for every task
    assert out["school_c"].shape == (7, 1)
    out["school_c"].sum().backward()
    assert all(p.grad is None for t in ("school_a", "school_b") for p in model.heads[t].parameters())
    assert all(p.grad is not None for p in model.shared_parameters())
    with pytest.raises(ValueError):
        model(torch.randn(2, 5, 4, device=device))


def test_trains_multi_input(device, fit):
    torch.manual_seed(0)
    model = build(device)
    x = torch.randn(3, 32, 4, device=device)
    w = torch.randn(3, 4, device=device)
    y = torch.einsum("tnd,td->tn", x, w)[..., None]  # related linear tasks
    losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], y[i]) for i, t in enumerate(TASKS)), steps=60, lr=0.02)
    assert losses[-1] < 0.3 * losses[0]


def test_hgnn_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("hgnn", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_intra_and_inter_task_gnns_have_their_own_weights(device):
    """W (point graph) and U (task graph) are separate: moving U leaves points and e_t alone."""
    model = build(device)
    intra = {id(p) for p in model.intra_task.parameters()}
    assert intra and not intra & {id(p) for p in model.inter_task.parameters()}
    x = torch.randn(3, 5, 4, device=device)
    before = model.hierarchy(x)
    with torch.no_grad():
        for p in model.inter_task.parameters():
            p.add_(0.5)
    after = model.hierarchy(x)
    torch.testing.assert_close(after["points"], before["points"])
    torch.testing.assert_close(after["task_embeddings"], before["task_embeddings"])
    assert not torch.allclose(after["updated_task_embeddings"], before["updated_task_embeddings"])


def test_graph_layer_by_hand_from_its_weight_matrices():
    """h'_i = relu(W_s h_i + b_s + sum_j a_ij W_n h_j): the neighbour map has no bias (rows of A sum to 1,
    so one would only repeat b_s) and the key map has none (softmax ignores a shift of a row)."""
    from reference_impls.architectures.hgnn import AttentionGraphLayer

    torch.manual_seed(0)
    d = 6
    layer = AttentionGraphLayer(d)
    assert sum(p.numel() for p in layer.parameters()) == 4 * d * d + 2 * d  # q, k, W_s, W_n; biases of q, W_s
    h = torch.randn(5, d)
    q = h @ layer.query.weight.T + layer.query.bias
    a = torch.softmax(q @ (h @ layer.key.weight.T).T / d ** 0.5, dim=-1)
    own = h @ layer.self_weight.weight.T + layer.self_weight.bias
    expected = torch.relu(own + a @ h @ layer.neighbour_weight.weight.T)
    torch.testing.assert_close(layer(h), expected)


def test_from_problem_passes_width_and_head_options_on():
    """``width`` is the hidden size d; other keywords (here a hidden head layer) reach the model."""
    from reference_impls.architectures import registry

    model = registry.build("hgnn", registry.Problem(("a", "b"), (4,), {"a": 2, "b": 1}), width=6, head_hidden=(5,))
    assert model.encoder.out_dim == 6
    linears = [m for m in model.heads["a"].modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 5), (5, 2)]  # [h'_i; e'_t] -> 5 -> 2
