import math

import pytest
import torch

from reference_impls.architectures.pepnet import GateNU, PEPNet
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (10,), {"a": 1, "b": 2})


def test_gate_nu_lies_between_zero_and_gamma(device):
    torch.manual_seed(0)
    gate = GateNU(5, 7, hidden=6).to(device)
    g = gate(torch.randn(200, 5, device=device))
    assert ((g > 0) & (g < 2)).all()
    saturated = gate(torch.randn(200, 5, device=device) * 1e4)
    assert ((saturated >= 0) & (saturated <= 2)).all()
    assert saturated.max() > 1.99 or saturated.min() < 0.01  # the full range is reachable


def zero_gate_logits(model: PEPNet) -> None:
    with torch.no_grad():
        for gate in [model.ep_gate, *model.pp_gates]:
            gate.second.weight.zero_()
            gate.second.bias.zero_()


def test_zero_gate_logits_give_scale_one_and_the_plain_network(device):
    torch.manual_seed(1)
    model = build("pepnet", VEC).to(device)
    zero_gate_logits(model)
    x = torch.randn(6, 10, device=device)
    e, delta_domain, delta_task = model.personalize(x)
    for g in [delta_domain, *delta_task]:
        torch.testing.assert_close(g, torch.ones_like(g))  # 2 * sigmoid(0) = 1
    out = model(x)
    for t in VEC.tasks:
        h = model.embedding(x)
        layers = model.towers[t]
        h = layers[1](torch.relu(layers[0](h)))  # no personalisation at all
        torch.testing.assert_close(out[t], h)


def test_epnet_and_ppnet_follow_eqs_5_to_9(device):
    torch.manual_seed(2)
    model = build("pepnet", VEC, prior_dim=3).to(device)
    x = torch.randn(5, 10, device=device)
    prior = x[:, :3]
    e = model.embedding(x)
    d_dom = model.ep_gate(torch.cat([prior, e], -1))  # Eq. (5)
    o_ep = d_dom * e  # Eq. (6)
    d0, d1 = (gate(torch.cat([prior, o_ep], -1)) for gate in model.pp_gates)  # Eq. (7)
    tower = model.towers["b"]
    h1 = torch.relu(tower[0](d0[:, 16:] * o_ep))  # b is the second slice of h * T, Eqs. (8)-(9)
    torch.testing.assert_close(model(x)["b"], tower[1](d1[:, 16:] * h1))


def test_stop_gradient_keeps_gates_from_steering_the_embedding(device):
    torch.manual_seed(3)
    model = build("pepnet", VEC).to(device)
    x = torch.randn(8, 10, device=device)
    weight = model.embedding.blocks[0][0].weight

    def embedding_grad(outputs):
        loss = sum(o.square().sum() for o in outputs.values())
        (g,) = torch.autograd.grad(loss, weight, retain_graph=True)
        return g

    e, d_dom, d_task = model.personalize(x)
    got = embedding_grad(model.towers_with(e, d_dom, d_task))
    frozen = embedding_grad(model.towers_with(e, d_dom.detach(), [d.detach() for d in d_task]))
    torch.testing.assert_close(got, frozen)  # the gates see E only through sg(.)
    prior = model.prior(x)  # the same model without stop-gradients differs:
    leaky_dom = model.ep_gate(torch.cat([prior, e], -1))
    leaky_task = [g(torch.cat([prior, leaky_dom * e], -1)) for g in model.pp_gates]
    leaky = embedding_grad(model.towers_with(e, leaky_dom, leaky_task))
    assert (leaky - frozen).abs().max() > 1e-4


def test_gradients_reach_gates_and_only_the_own_tower(device, params_with_grad):
    torch.manual_seed(4)
    model = build("pepnet", VEC).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 10, device=device))["a"].sum())
    assert any(n.startswith("ep_gate.") for n in touched)
    assert any(n.startswith("pp_gates.1.") for n in touched)
    assert any(n.startswith("embedding.") for n in touched)
    assert not any(n.startswith("towers.b") for n in touched)
    assert {id(p) for p in model.task_specific_parameters("b")} == {id(p) for p in model.towers["b"].parameters()}


def test_parameter_count(n_params):
    d, w, p, g, h, T = 10, 16, 8, 16, 16, 2
    model = build("pepnet", VEC, width=w, hidden_dims=(h,), prior_dim=p, gate_hidden=g)
    embedding = d * w + w
    gate = lambda out: (p + w) * g + g + g * out + out  # noqa: E731 - Eqs. (2)-(3)
    gates = gate(w) + gate(w * T) + gate(h * T)
    towers = 2 * (w * h + h) + (h * 1 + 1) + (h * 2 + 2)
    assert n_params(model) == embedding + gates + towers


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("pepnet", device)
    first, last = short_training("pepnet", dense, device, steps=20)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("pepnet", VEC)
    assert type(model) is PEPNet and model.name == "pepnet"


@pytest.mark.parametrize("x", [-1.0, 0.5, 2.0])
def test_gate_nu_by_hand(x):
    """Eqs. (2)-(3) on one unit: x' = ReLU(w x + b), delta = 2 sigmoid(w' x' + b')."""
    gate = GateNU(1, 1, hidden=1).double()
    with torch.no_grad():
        gate.first.weight.fill_(1.5), gate.first.bias.fill_(0.5)
        gate.second.weight.fill_(-2.0), gate.second.bias.fill_(1.0)
    hidden = max(0.0, 1.5 * x + 0.5)  # at x = -1 the ReLU zeroes the hidden unit: 2 sigmoid(1)
    expected = 2 / (1 + math.exp(-(-2.0 * hidden + 1.0)))
    got = gate(torch.tensor([[x]], dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_every_task_s_tower_reads_its_own_slice_of_each_ppnet_gate(device):
    """delta_task^l has h * T entries split into T slices in task order (Eqs. (7)-(8))."""
    torch.manual_seed(5)
    problem = Problem(("a", "b", "c"), (10,), {"a": 1, "b": 2, "c": 1})
    model = build("pepnet", problem, width=4, hidden_dims=(3,), prior_dim=3).to(device)
    x = torch.randn(5, 10, device=device)
    e, d_dom, (d0, d1) = model.personalize(x)
    o_ep = d_dom * e
    out = model(x)
    for k, t in enumerate(problem.tasks):
        tower = model.towers[t]
        h1 = torch.relu(tower[0](d0[:, 4 * k:4 * (k + 1)] * o_ep))
        torch.testing.assert_close(out[t], tower[1](d1[:, 3 * k:3 * (k + 1)] * h1))


@pytest.mark.parametrize("dense", (True, False))
def test_images_use_channel_means_as_prior_and_gate_per_channel(device, dense):
    """For an image the prior is its per-channel mean and the gates read spatial means; every gate
    scales whole channels; image-level problems average O_ep over space before the towers."""
    torch.manual_seed(6)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 3, "b": 3}, dense=dense)
    model = build("pepnet", problem, width=4, hidden_dims=(3,)).to(device)
    x = torch.randn(2, 2, 4, 4, device=device) * 2 + 1
    prior, e = x.mean(dim=(2, 3)), model.embedding(x)
    d_dom = model.ep_gate(torch.cat([prior, e.mean(dim=(2, 3))], -1))  # Eq. (5)
    o_ep = d_dom[:, :, None, None] * e  # Eq. (6), per channel
    d0, d1 = (g(torch.cat([prior, o_ep.mean(dim=(2, 3))], -1)) for g in model.pp_gates)  # Eq. (7)
    h = o_ep if dense else o_ep.mean(dim=(2, 3))
    scale = (lambda g: g[:, :, None, None]) if dense else (lambda g: g)  # noqa: E731
    tower = model.towers["b"]
    h1 = torch.relu(tower[0](scale(d0[:, 4:]) * h))
    torch.testing.assert_close(model(x)["b"], tower[1](scale(d1[:, 3:]) * h1))


def test_an_image_prior_has_one_mean_per_channel_even_past_prior_dim():
    # an image's prior is its channel means, all of them, whatever prior_dim says
    torch.manual_seed(0)
    model = build("pepnet", Problem(("a", "b"), (10, 4, 4), {"a": 1, "b": 2}), width=8, prior_dim=4)
    assert model.prior_dim == 10 and model(torch.randn(2, 10, 4, 4))["b"].shape == (2, 2)


def test_the_registry_passes_gate_hidden_to_every_gate():
    model = build("pepnet", VEC, width=8, gate_hidden=5)
    assert model.ep_gate.first.out_features == 5
    assert all(g.first.out_features == 5 for g in model.pp_gates)
