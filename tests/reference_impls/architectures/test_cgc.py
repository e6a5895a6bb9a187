import pytest
import torch

from reference_impls.architectures.cgc import CGC
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 1, "c": 2})


def test_gates_cover_own_and_shared_experts(device):
    torch.manual_seed(6)
    model = build("cgc", VEC, shared_experts=3, task_experts=2).to(device)
    for g in model.gate_probabilities(torch.randn(10, 6, device=device) * 4).values():
        assert g.shape == (10, 5) and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(10, device=device))


def test_task_experts_get_no_gradient_from_other_tasks(device, params_with_grad):
    torch.manual_seed(6)
    model = build("cgc", VEC, shared_experts=2, task_experts=2).to(device)
    x = torch.randn(8, 6, device=device)
    for task in VEC.tasks:  # every task, so a task reading another's experts or gate fails
        touched = params_with_grad(model, model(x)[task].sum())
        for other in set(VEC.tasks) - {task}:
            assert not any(n.startswith((f"task_experts.{other}", f"gates.{other}", f"towers.{other}"))
                           for n in touched)
        assert any(n.startswith(f"task_experts.{task}.0") for n in touched)
        assert any(n.startswith(f"task_experts.{task}.1") for n in touched)
        assert any(n.startswith(f"gates.{task}") for n in touched)
        assert all(any(n.startswith(f"shared_experts.{i}.") for n in touched) for i in range(2))


def test_specific_and_shared_split():
    model = build("cgc", VEC)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.shared_experts.parameters()}


def test_parameter_count(n_params):
    T, d, w, ms, mk = 3, 6, 16, 2, 1
    model = build("cgc", VEC, width=w, depth=1, shared_experts=ms, task_experts=mk)
    expert = d * w + w
    gates = T * d * (mk + ms)
    towers = (w + 1) + (w + 1) + (2 * w + 2)
    assert n_params(model) == (ms + T * mk) * expert + gates + towers


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links the PLE paper to CGC too; the registry name must build exactly it."""
    model = build("cgc", VEC, shared_experts=2, task_experts=1)
    assert type(model) is CGC and model.name == "cgc"


def test_output_is_eq_2_to_5_with_own_experts_first(device):
    """y^k = t^k(w^k(x) S^k(x)), S^k = [own experts, then shared experts] (Eq. 4 order)."""
    torch.manual_seed(6)
    model = build("cgc", VEC, shared_experts=2, task_experts=2).to(device)
    x = torch.randn(4, 6, device=device)
    out = model(x)
    for t in VEC.tasks:
        w = torch.softmax(x @ model.gates[t][1].weight.T, -1)  # Eq. (3), bias-free
        experts = list(model.task_experts[t]) + list(model.shared_experts)  # Eq. (4)
        mixed = sum(w[:, i : i + 1] * e(x) for i, e in enumerate(experts))  # Eq. (2)
        torch.testing.assert_close(out[t], model.towers[t](mixed))  # Eq. (5)


@pytest.mark.parametrize("arch", ["cgc", "ple", "stem"])
@pytest.mark.parametrize("shared, specific, refusal", [
    (-1, 2, "shared_experts must be at least 0, got -1"),
    (2, -1, "task_experts must be at least 0, got -1"),
    (0, 0, "every task needs an expert: shared_experts \\+ task_experts must be at least 1, got 0"),
])
def test_expert_counts_may_be_zero_but_not_negative_or_both_zero(arch, shared, specific, refusal):
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=refusal):
        build(arch, problem, shared_experts=shared, task_experts=specific)
    for counts in ((0, 1), (1, 0)):  # only shared or only task-specific experts: a model
        model = build(arch, problem, shared_experts=counts[0], task_experts=counts[1])
        assert set(model(torch.randn(3, 6))) == {"a", "b"}
