"""The per-task-wrapped backbone behind LoRA, MTL-LoRA, residual adapters and Piggyback."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build, get
from reference_impls.architectures.task_adapted import TaskAdaptedBackbone

ADAPTED = sorted(n for n in available() if issubclass(get(n), TaskAdaptedBackbone))
PROBLEMS = [Problem(("a", "b", "c"), (5,), {"a": 2, "b": 1, "c": 1}),
            Problem(("a", "b", "c"), (3, 8, 8), {"a": 2, "b": 1, "c": 1}, dense=True)]


def test_the_five_wrapped_backbone_models_share_it():
    assert ADAPTED == ["lora", "mtl_lora", "parallel_residual_adapters", "piggyback", "residual_adapters"]


@pytest.mark.parametrize("problem", PROBLEMS, ids=["vector", "image"])
@pytest.mark.parametrize("name", ADAPTED)
def test_each_task_output_reaches_exactly_its_own_task_parameters(device, name, problem):
    model = build(name, problem).to(device)
    own = {t: {id(p) for p in model.task_specific_parameters(t)} for t in problem.tasks}
    assert all(own[s].isdisjoint(own[t]) for s in own for t in own if s < t)
    # The backbone is frozen (or masked): what trains is one task's, except MTL-LoRA's shared A and B^i.
    specific = set().union(*own.values())
    shared = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in specific}
    assert all(n.split(".")[2] in ("down", "up") for n in shared) and bool(shared) == (name == "mtl_lora")
    x = torch.randn(4, *problem.input_shape, device=device)
    for task in problem.tasks:
        model.zero_grad(set_to_none=True)
        model(x)[task].sum().backward()
        reached = {n if id(p) not in specific else id(p) for n, p in model.named_parameters() if p.grad is not None}
        assert reached == own[task] | shared, task
