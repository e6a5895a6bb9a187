import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.stem import STEM

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_task_a_loss_sends_no_gradient_into_task_b_embedding(device):
    torch.manual_seed(0)
    model = build("stem", VEC, task_experts=2, shared_experts=1).to(device)
    loss = model(torch.randn(8, 6, device=device))["a"].square().sum()
    b_params = [*model.task_embeddings["b"].parameters(), *model.task_experts["b"].parameters()]
    grads = torch.autograd.grad(loss, b_params, allow_unused=True)
    assert all(g is None for g in grads)  # not small: no path at all
    a_emb = next(model.task_embeddings["a"].parameters())
    shared_emb = next(model.shared_embedding.parameters())
    g_a, g_s = torch.autograd.grad(model(torch.randn(8, 6, device=device))["a"].sum(), [a_emb, shared_emb])
    assert g_a.abs().sum() > 0 and g_s.abs().sum() > 0


def test_all_forward_task_b_embedding_shapes_task_a_output(device):
    torch.manual_seed(1)
    model = build("stem", VEC).to(device)
    x = torch.randn(5, 6, device=device)
    before = model(x)
    with torch.no_grad():
        next(model.task_embeddings["b"].parameters()).add_(0.5)
    after = model(x)
    assert (after["a"] - before["a"]).abs().max() > 1e-3  # a reads b's experts forward


def test_output_is_the_gated_mixture_of_every_expert(device):
    torch.manual_seed(2)
    model = build("stem", VEC, task_experts=1, shared_experts=2).to(device)
    x = torch.randn(4, 6, device=device)
    e = {t: model.task_embeddings[t](x) for t in VEC.tasks}
    e_s = model.shared_embedding(x)
    experts = [model.task_experts["a"][0](e["a"]).detach(), model.task_experts["b"][0](e["b"])]  # sg on a's
    experts += [s(e_s) for s in model.shared_experts]
    gate = torch.softmax((e["b"] + e_s) @ model.gates["b"][1].weight.T, -1)
    mixed = sum(gate[:, i : i + 1] * experts[i] for i in range(4))
    got, expected = model(x)["b"], model.towers["b"](mixed)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.gate_probabilities(x)["b"], gate)
    # and the same gradients: the stop-gradient acts on a's expert outputs only, the gate's input e_b + e_s learns
    params = list(model.parameters())
    grads = zip(torch.autograd.grad(got.sum(), params, allow_unused=True),
                torch.autograd.grad(expected.sum(), params, allow_unused=True), strict=True)
    for g_got, g_hand in grads:
        assert (g_got is None) == (g_hand is None)
        if g_got is not None:
            torch.testing.assert_close(g_got, g_hand)


def test_task_specific_split_matches_the_gradients(device, params_with_grad):
    torch.manual_seed(3)
    model = build("stem", VEC).to(device)
    named = dict(model.named_parameters())
    x = torch.randn(8, 6, device=device)
    touched = {t: params_with_grad(model, model(x)[t].sum()) for t in VEC.tasks}
    assert {n for n in touched["a"] if n.startswith("shared")} == {n for n in named if n.startswith("shared")}
    for t, other in (("a", "b"), ("b", "a")):
        specific = {id(p) for p in model.task_specific_parameters(t)}
        assert {id(named[n]) for n in touched[t] - touched[other]} == specific
        assert not any(id(named[n]) in specific for n in touched[other])


def test_parameter_count(n_params):
    T, d, w, m, ms = 2, 6, 16, 2, 1
    model = build("stem", VEC, width=w, depth=1, task_experts=m, shared_experts=ms)
    embeddings = (T + 1) * (d * w + w)
    experts = (T * m + ms) * (w * w + w)
    gates = T * w * (T * m + ms)
    towers = (w + 1) + (2 * w + 2)
    assert n_params(model) == embeddings + experts + gates + towers


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("stem", device)
    first, last = short_training("stem", dense, device, steps=15)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("stem", VEC)
    assert type(model) is STEM and model.name == "stem"
