import copy

import pytest

import torch

from reference_impls.architectures.mmoe import MMoE
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (7,), {"a": 1, "b": 2})


def test_gates_are_probability_distributions(device):
    torch.manual_seed(5)
    model = build("mmoe", VEC, num_experts=5).to(device)
    gates = model.gate_probabilities(torch.randn(9, 7, device=device) * 3)
    for g in gates.values():
        assert g.shape == (9, 5) and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(9, device=device))


def test_output_is_gate_weighted_sum_of_shared_experts(device):
    torch.manual_seed(5)
    model = build("mmoe", VEC, num_experts=3).to(device)
    x = torch.randn(4, 7, device=device)
    out = model(x)
    gate = torch.softmax(x @ model.gates["b"][1].weight.T, -1)  # Eq. (8)
    mixed = sum(gate[:, i : i + 1] * model.experts[i](x) for i in range(3))  # Eq. (7)
    torch.testing.assert_close(out["b"], model.towers["b"](mixed))  # Eq. (6)


def test_one_expert_is_shared_bottom(device):
    torch.manual_seed(5)
    model = build("mmoe", VEC, num_experts=1).to(device)
    hard = SharedBottom(VEC.tasks, copy.deepcopy(model.experts[0]), copy.deepcopy(model.towers))
    x = torch.randn(4, 7, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], hard(x)[t])


def test_every_expert_serves_every_task(device, params_with_grad):
    torch.manual_seed(5)
    model = build("mmoe", VEC, num_experts=3).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 7, device=device))["a"].sum())
    assert all(any(n.startswith(f"experts.{i}.") for n in touched) for i in range(3))
    assert not any(n.startswith(("gates.b", "towers.b")) for n in touched)


def test_parameter_count(n_params):
    d, w, n = 7, 16, 4
    model = build("mmoe", VEC, width=w, depth=1, num_experts=n)
    experts = n * (d * w + w)
    gates = 2 * d * n  # bias-free, Eq. (8)
    towers = (w + 1) + (2 * w + 2)
    assert n_params(model) == experts + gates + towers


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to MMoE; the registry name must build exactly it."""
    model = build("mmoe", VEC, num_experts=3)
    assert type(model) is MMoE
    assert model.name == "mmoe"


def test_task_specific_split_is_exactly_gate_and_tower(device, split_by_task):
    """Eq. (6)-(8): only g^k and h^k are task k's own; every expert is shared."""
    torch.manual_seed(5)
    model = build("mmoe", VEC, num_experts=3).to(device)
    split = split_by_task(model, torch.randn(6, 7, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"gates.{t}.", f"towers.{t}."))


@pytest.mark.parametrize("name, experts, sites", [("mmoe", 4, 1), ("dselect_k", 4, 1), ("adatt", 11, 2)])
def test_experts_that_every_gate_mixes_are_kept_for_backward_once_not_once_per_task(name, experts, sites):
    """Five tasks' gates mix the same n experts (AdaTT: 5 x 2 task experts and 1 shared, at each of
    two levels). Stacking the expert list inside every gate's mix kept a copy per task for the
    backward pass; AdaTT on 40 CelebA tasks at 64 x 64 ran out of memory in its first step."""
    tasks = tuple("abcde")
    problem = Problem(tasks, (7,), {t: 1 for t in tasks})
    options = {"adatt": {"task_experts": 2, "shared_experts": 1}}.get(name, {})
    model = build(name, problem, **options)
    stacks = set()

    def keep(saved):
        if saved.dim() == 3 and sorted(saved.shape[:2]) == sorted((experts, 6)):  # the stack or a view of it
            stacks.add(saved.untyped_storage().data_ptr())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda saved: saved):
        outputs = model(torch.randn(6, 7))
    assert len(stacks) == sites
    sum(o.sum() for o in outputs.values()).backward()  # and the stack serves every task's gradient
