"""PaMaL: α = e_k is member k, θ(α) linear in α, member gradients ∝ α_k, trade-offs, training."""

import pytest
import torch
from torch.func import functional_call

from reference_impls.architectures.pamal import PaMaL
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_preferences_reach_opposite_trade_offs

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def test_one_hot_preference_is_exactly_that_member(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        members = [SharedBottom.from_problem(problem, 6) for _ in problem.tasks]
        model = PaMaL([SharedBottom.from_problem(problem, 6) for _ in problem.tasks])
        with torch.no_grad():  # load known members
            for n in model.param_names:
                model.members[n.replace(".", "__")].copy_(torch.stack([dict(m.named_parameters())[n] for m in members]))
        model, x = model.to(device), torch.randn(3, *problem.input_shape, device=device)
        for k, member in enumerate(members):
            expected = member.to(device)(x)
            got = model(x, torch.eye(2, device=device)[k])
            for t in problem.tasks:
                torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-6)  # conv kernels may round differently


def test_combined_parameters_are_linear_in_alpha():
    torch.manual_seed(0)
    model = build("pamal", VEC, width=6)
    a, b = torch.tensor([0.2, 0.8]), torch.tensor([0.9, 0.1])
    pa, pb, pm = (model.combined_parameters(p) for p in (a, b, 0.3 * a + 0.7 * b))
    for n in pm:
        torch.testing.assert_close(pm[n], 0.3 * pa[n] + 0.7 * pb[n])
    x = torch.randn(4, 6)
    template = SharedBottom.from_problem(VEC, 6)
    direct = functional_call(template, pm, (x,))
    torch.testing.assert_close(model(x, 0.3 * a + 0.7 * b)["b"], direct["b"])


def test_member_gradients_are_alpha_times_the_combined_gradient(device, params_with_grad):
    torch.manual_seed(0)
    model = build("pamal", VEC, width=6).to(device)
    x, alpha = torch.randn(5, 6, device=device), torch.tensor([0.25, 0.75], device=device)
    params = {n: p.detach().requires_grad_() for n, p in model.combined_parameters(alpha).items()}
    template = SharedBottom.from_problem(VEC, 6).to(device)
    loss = sum(o.square().sum() for o in functional_call(template, params, (x,)).values())
    loss.backward()
    model.zero_grad()
    sum(o.square().sum() for o in model(x, alpha).values()).backward()
    for n in model.param_names:
        stacked = model.members[n.replace(".", "__")].grad
        torch.testing.assert_close(stacked, alpha[:, None].reshape(2, *[1] * params[n].ndim) * params[n].grad)
    touched = params_with_grad(model, model(x, torch.tensor([0.0, 1.0], device=device))["a"].sum())
    names = [n.removeprefix("members.") for n in touched]
    assert names and all(model.members[n].grad[0].abs().sum() == 0 for n in names)  # α_a = 0: member a idle
    assert not any(n.startswith("heads__b") for n in names)


def test_parameter_count_is_k_networks(n_params):
    model = build("pamal", VEC, width=8)
    assert n_params(model) == 2 * n_params(SharedBottom.from_problem(VEC, 8))
    head = n_params(SharedBottom.from_problem(VEC, 8).heads["b"])
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == 2 * head


def test_sampled_preference_and_weighted_loss():
    model = build("pamal", VEC, width=4)
    alpha = model.sample_preference(torch.Generator().manual_seed(3))
    assert (alpha >= 0).all() and torch.isclose(alpha.sum(), torch.tensor(1.0))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(5.0)}
    torch.testing.assert_close(model.weighted_loss(losses), alpha[0] * 2.0 + alpha[1] * 5.0)
    with pytest.raises(ValueError):
        model.set_preference(torch.tensor([-0.5, 1.5]))


def test_default_preference_is_uniform_so_the_plain_call_is_the_midpoint_model():
    torch.manual_seed(0)
    model = build("pamal", VEC, width=6)
    torch.testing.assert_close(model.preference, torch.tensor([0.5, 0.5]))
    for n, w in model.combined_parameters().items():
        stacked = model.members[n.replace(".", "__")]
        torch.testing.assert_close(w, (stacked[0] + stacked[1]) / 2)
    x = torch.randn(3, 6)
    for t, out in model(x).items():
        torch.testing.assert_close(out, model(x, torch.tensor([0.5, 0.5]))[t])


def test_weighted_loss_uses_an_explicit_preference_over_the_current_one():
    model = build("pamal", VEC, width=4)  # current preference: uniform
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(5.0)}
    torch.testing.assert_close(model.weighted_loss(losses, torch.tensor([0.2, 0.8])), torch.tensor(4.4))
    torch.testing.assert_close(model.weighted_loss(losses), torch.tensor(3.5))


def test_members_start_from_independent_initialisations():
    torch.manual_seed(0)
    model = PaMaL.from_problem(VEC, width=6)
    for n in model.param_names:
        stacked = model.members[n.replace(".", "__")]
        assert not torch.equal(stacked[0], stacked[1]), n


def test_forward_refuses_a_preference_off_the_simplex():
    model = build("pamal", VEC, width=4)
    for bad in (torch.tensor([-0.5, 1.5]), torch.tensor([0.6, 0.6])):
        with pytest.raises(ValueError):
            model(torch.randn(2, 6), bad)


def test_preferences_reach_different_non_dominated_trade_offs():
    """Two conflicting regression targets: α = e_a and α = e_b end at opposite, non-dominated points."""
    torch.manual_seed(0)
    model = PaMaL.from_problem(Problem(("a", "b"), (4,), {"a": 1, "b": 1}), width=8)
    assert_preferences_reach_opposite_trade_offs(model, "weighted_loss", steps=120, lr=2e-2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("pamal", device)
    first, last = short_training("pamal", dense, device, steps=40)
    assert last < 0.8 * first


def test_a_single_task_pamal_is_its_one_member_and_depth_reaches_the_members():
    one = Problem(("a",), (6,), {"a": 2})
    torch.manual_seed(0)
    member = SharedBottom.from_problem(one, 6)
    x = torch.randn(3, 6)
    expected = member(x)["a"]
    model = PaMaL([member])  # K = 1: alpha = (1,), theta(alpha) = theta_1
    torch.testing.assert_close(model(x)["a"], expected)
    deep, shallow = PaMaL.from_problem(VEC, width=6, depth=3), PaMaL.from_problem(VEC, width=6, depth=1)
    assert len(deep.param_names) > len(shallow.param_names)  # more encoder layers per member


def test_sampled_preferences_follow_the_given_generator_and_preferences_take_the_model_dtype():
    model = PaMaL.from_problem(VEC, width=6)
    torch.manual_seed(1)
    first = model.sample_preference(torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    assert torch.equal(model.sample_preference(torch.Generator().manual_seed(7)), first)
    double = model.double()
    x = torch.randn(2, 6, dtype=torch.float64)
    alpha = torch.tensor([0.3, 0.7])  # float32 preference for a float64 model
    for t, out in double(x, alpha).items():
        torch.testing.assert_close(out, double(x, alpha.double())[t])


def test_the_callers_models_are_left_as_they_were():
    """PaMaL copies its members' weights; the models passed in stay usable on their own device."""
    torch.manual_seed(0)
    templates = [SharedBottom.from_problem(VEC, 6) for _ in VEC.tasks]
    before = [{n: p.clone() for n, p in t.named_parameters()} for t in templates]
    PaMaL(templates)
    x = torch.randn(2, 6)
    for template, weights in zip(templates, before):
        for n, p in template.named_parameters():
            assert p.device.type == "cpu"
            torch.testing.assert_close(p, weights[n], rtol=0, atol=0)
        assert template(x)["b"].shape == (2, 2)
