"""MRAN: feature-feature, task-feature and task-task attention, computed by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reference_impls.architectures.mran import MRAN

TASKS = ("rating", "useful", "funny")


def build(device):
    torch.manual_seed(0)
    return MRAN(TASKS, 5, {"rating": 1, "useful": 2, "funny": 2}, embed_dim=4, num_heads=2).to(device)


def test_attention_maps_are_distributions(device):
    model = build(device)
    rel = model.relations(torch.randn(3, 5, device=device))
    assert rel["feature_feature"].shape == (3, 2, 5, 5)
    assert rel["task_feature"].shape == (3, 3, 5)
    assert rel["task_task"].shape == (3, 3, 3)
    for key in ("feature_feature", "task_feature", "task_task"):
        torch.testing.assert_close(rel[key].sum(-1), torch.ones_like(rel[key].sum(-1)))


def test_task_feature_and_task_task_modules_by_hand(device):
    model = build(device)
    x = torch.randn(2, 5, device=device)
    rel = model.relations(x)
    u = rel["tokens"][1]  # feature tokens after the feature-feature module
    raw = x[1, :, None] * model.field_embeddings + model.field_biases
    assert not torch.allclose(u, raw)  # interaction changed the tokens
    k, v = model.feature_keys(u), model.feature_values(u)
    weights = torch.softmax(model.task_queries @ k.T / 2.0, -1)  # sqrt(e) = 2
    torch.testing.assert_close(rel["task_feature"][1], weights)
    reps = weights @ v
    torch.testing.assert_close(rel["task_representations"][1], reps)
    tt = torch.softmax(model.task_q(reps) @ model.task_k(reps).T / math.sqrt(4), -1)
    torch.testing.assert_close(rel["task_task"][1], tt)
    torch.testing.assert_close(rel["related_representations"][1], reps + tt @ model.task_v(reps))


def test_feature_feature_module_is_residual_multihead_self_attention_by_hand(device):
    """u <- u + W_o concat_h softmax(Q_h K_h^T / sqrt(e/heads)) V_h over the feature tokens."""
    model = build(device)
    x = torch.randn(2, 5, device=device)
    raw = x[:, :, None] * model.field_embeddings + model.field_biases
    attn = model.feature_attention
    q, k, v = (raw @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, -1)
    q, k, v = (t.view(2, 5, 2, 2).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), -1)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 5, 4)
    rel = model.relations(x)
    torch.testing.assert_close(rel["feature_feature"], weights)
    torch.testing.assert_close(rel["tokens"], raw + attn.out_proj(mixed))


def test_each_tower_reads_its_own_related_representation(device):
    model = build(device)
    x = torch.randn(3, 5, device=device)
    related = model.relations(x)["related_representations"]
    out = model(x)
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(out[t], model.towers[t](related[:, i]))


def test_registry_gives_a_task_without_a_width_one_output():
    """Problem.task_out_dims: a task the problem leaves without a width gets 1 (was a KeyError)."""
    from reference_impls.architectures import registry

    out = registry.build("mran", registry.Problem(("a", "b"), (4,), {"a": 2}))(torch.randn(3, 4))
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)


def test_task_relations_share_queries_but_not_towers(device):
    model = build(device)
    out = model(torch.randn(4, 5, device=device))
    assert out["rating"].shape == (4, 1) and out["funny"].shape == (4, 2)
    out["rating"].sum().backward()
    grad = model.task_queries.grad
    # Through the task-task module, the "rating" loss moves every task's query.
    assert (grad.abs().sum(-1) > 0).all()
    assert all(p.grad is None for t in ("useful", "funny") for p in model.towers[t].parameters())
    assert all(p.grad is not None for p in model.shared_parameters())


def test_trains_on_related_tasks(device, fit):
    torch.manual_seed(0)
    x = torch.randn(64, 5, device=device)
    y = {"rating": x[:, :1] * 2, "useful": (x[:, 0] + x[:, 1] > 0).long(), "funny": (x[:, 2] > 0).long()}
    model = build(device)
    def loss_of(out):
        return (F.mse_loss(out["rating"], y["rating"]) + F.cross_entropy(out["useful"], y["useful"])
                + F.cross_entropy(out["funny"], y["funny"]))

    losses = fit(model, x, loss_of, steps=60, lr=0.02)
    assert losses[-1] < 0.5 * losses[0]


def test_mran_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("mran", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_every_feature_has_its_own_embedding_and_bias(device):
    """u_i = x_i E_i + b_i with one E_i, b_i per input feature (a single shared E, b passed before)."""
    model = build(device)
    assert model.field_embeddings.shape == (5, 4) and model.field_biases.shape == (5, 4)
    with torch.no_grad():
        model.field_biases.normal_()
    x = torch.randn(3, 5, device=device)
    tokens = model.feature_tokens(x)
    for i in range(5):
        torch.testing.assert_close(tokens[:, i], x[:, i, None] * model.field_embeddings[i] + model.field_biases[i])
    # Two features with the same value still give different tokens.
    same = model.feature_tokens(torch.ones(1, 5, device=device))[0]
    assert not torch.allclose(same[0], same[1])


def test_builds_and_runs_with_its_defaults():
    """Every constructor default together makes a working model (the embedding splits into the heads)."""
    torch.manual_seed(0)
    out = MRAN(TASKS, 5, {"rating": 1, "useful": 2, "funny": 2})(torch.randn(3, 5))
    assert {t: o.shape for t, o in out.items()} == {"rating": (3, 1), "useful": (3, 2), "funny": (3, 2)}


def test_towers_have_the_hidden_widths_asked_for():
    """tower_hidden = (5, 3): each tower is e -> 5 -> 3 -> out."""
    torch.manual_seed(0)
    model = MRAN(TASKS, 5, {"rating": 1, "useful": 2, "funny": 2}, embed_dim=4, tower_hidden=(5, 3))
    for t, out in (("rating", 1), ("useful", 2), ("funny", 2)):
        linears = [m for m in model.towers[t].modules() if isinstance(m, torch.nn.Linear)]
        assert [tuple(m.weight.shape) for m in linears] == [(5, 4), (3, 5), (out, 3)]


def test_registry_width_is_the_embedding_size_and_options_pass_through():
    from reference_impls.architectures import registry

    torch.manual_seed(0)
    model = registry.build("mran", registry.Problem(("a", "b"), (4,), {"a": 1}), width=6, num_heads=3)
    assert model.field_embeddings.shape == (4, 6) and model.feature_attention.num_heads == 3
    assert model(torch.randn(2, 4))["b"].shape == (2, 1)
