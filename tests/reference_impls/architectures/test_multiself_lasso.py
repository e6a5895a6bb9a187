"""Lasso layer combination: the mix by hand, one-hot α is the multi-head net, the L1 term, sparsity."""

import copy

import pytest
import torch
from torch import nn

from reference_impls.architectures.multiself_lasso import MultiSelfLasso, lasso_penalty
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 2, "b": 1}, dense=True)


def test_each_head_reads_its_own_alpha_mix_of_the_units(device):
    torch.manual_seed(0)
    model = build("multiself_lasso", VEC, width=6, num_units=3).to(device)
    with torch.no_grad():
        model.alphas["a"].copy_(torch.tensor([0.5, -2.0, 0.0]))
        model.alphas["b"].copy_(torch.tensor([0.0, 0.0, 3.0]))
    x = torch.randn(4, 5, device=device)
    units = model.unit_outputs(x)
    out = model(x)
    torch.testing.assert_close(out["a"], model.heads["a"](0.5 * units[0] - 2.0 * units[1]))
    torch.testing.assert_close(out["b"], model.heads["b"](3.0 * units[2]))


def test_one_hot_alpha_on_the_last_unit_is_the_multi_head_network(device):
    for problem in (VEC, IMG):
        torch.manual_seed(1)
        model = build("multiself_lasso", problem, width=6, num_units=3).to(device)  # 3: last is not second
        trunk = nn.Sequential(copy.deepcopy(model.stem), *copy.deepcopy(model.units))
        multi_head = SharedBottom(problem.tasks, trunk, copy.deepcopy(model.heads)).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        out, expected = model(x), multi_head(x)  # α is initialised one-hot on the last unit
        for t in problem.tasks:
            torch.testing.assert_close(out[t], expected[t])


def test_units_are_residual_and_keep_the_shape():
    torch.manual_seed(2)
    model = build("multiself_lasso", IMG, width=4, num_units=3)
    units = model.unit_outputs(torch.randn(2, 2, 5, 5))
    assert all(u.shape == (2, 4, 5, 5) for u in units)
    torch.testing.assert_close(units[1], units[0] + model.units[1].block(units[0]))


def test_auxiliary_loss_is_lambda_times_the_l1_norm_of_every_alpha():
    model = build("multiself_lasso", VEC, width=4, num_units=3, lasso_weight=0.5)
    with torch.no_grad():
        model.alphas["a"].copy_(torch.tensor([1.0, -2.0, 0.0]))
        model.alphas["b"].copy_(torch.tensor([0.0, 0.5, -0.25]))
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(0.5 * (3.0 + 0.75)))
    torch.testing.assert_close(lasso_penalty([torch.tensor([-1.0, 2.0])]), torch.tensor(3.0))


def test_the_lasso_gradient_is_lambda_sign_alpha_and_reaches_alpha_only():
    """The L1 subgradient: each step pulls every non-zero α towards 0 by the same amount,
    whatever its size, which is what makes unused units' weights exactly sparse."""
    model = build("multiself_lasso", VEC, width=4, num_units=3, lasso_weight=0.1)
    with torch.no_grad():
        model.alphas["a"].copy_(torch.tensor([2.0, -0.01, 0.3]))
        model.alphas["b"].copy_(torch.tensor([-5.0, 0.2, 0.0]))
    model.auxiliary_loss().backward()
    torch.testing.assert_close(model.alphas["a"].grad, torch.tensor([0.1, -0.1, 0.1]))
    torch.testing.assert_close(model.alphas["b"].grad, torch.tensor([-0.1, 0.1, 0.0]))
    others = [p for n, p in model.named_parameters() if not n.startswith("alphas.")]
    assert all(p.grad is None for p in others)


def test_task_specific_parameters_are_alpha_and_head():
    model = build("multiself_lasso", VEC, width=4, num_units=2)
    ids = {id(p) for p in model.task_specific_parameters("a")}
    assert id(model.alphas["a"]) in ids and id(model.alphas["b"]) not in ids
    assert all(id(p) in ids for p in model.heads["a"].parameters())
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.units.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"lasso_weight": -1.0}, "lasso_weight must be at least 0, got -1.0"),
    ({"num_units": 0}, "num_units must be at least 1, got 0"),
    ({"width": 0}, "width must be at least 1, got 0"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiSelfLasso.from_problem(VEC, **kwargs)


def test_the_task_loss_trains_alpha_by_the_chain_rule(device):
    """α is learned by the task's own loss: d loss / d α_m = <d loss / d r, Unit_m(x)>, and
    no other task's α gets a gradient."""
    torch.manual_seed(3)
    model = build("multiself_lasso", VEC, width=4, num_units=3).to(device)
    with torch.no_grad():
        model.alphas["a"].copy_(torch.tensor([0.7, -0.3, 1.2]))
    x = torch.randn(5, 5, device=device)
    units = [u.detach() for u in model.unit_outputs(x)]
    r = (0.7 * units[0] - 0.3 * units[1] + 1.2 * units[2]).requires_grad_()
    (d_r,) = torch.autograd.grad(model.heads["a"](r).square().sum(), r)
    model(x)["a"].square().sum().backward()
    torch.testing.assert_close(model.alphas["a"].grad, torch.stack([(d_r * u).sum() for u in units]))
    assert model.alphas["b"].grad is None


def test_the_lasso_weight_defaults_to_1e_3():
    model = build("multiself_lasso", VEC, width=4, num_units=2)
    assert model.lasso_weight == 1e-3
    torch.testing.assert_close(model.auxiliary_loss(), torch.tensor(1e-3 * 2))  # one-hot α per task
