"""The wrapped backbones: per task (LoRA, MTL-LoRA, residual adapters, Piggyback) and shared (HydraLoRA, MING-MoE)."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build, get
from reference_impls.architectures.task_adapted import SharedAdaptedBackbone, TaskAdaptedBackbone

ADAPTED = sorted(n for n in available() if issubclass(get(n), TaskAdaptedBackbone))
SHARED = sorted(n for n in available() if issubclass(get(n), SharedAdaptedBackbone))
PROBLEMS = [Problem(("a", "b", "c"), (5,), {"a": 2, "b": 1, "c": 1}),
            Problem(("a", "b", "c"), (3, 8, 8), {"a": 2, "b": 1, "c": 1}, dense=True)]


def test_the_wrapped_backbone_models_are_the_expected_ones():
    assert ADAPTED == ["lora", "mtl_lora", "parallel_residual_adapters", "piggyback", "residual_adapters"]
    assert SHARED == ["hydralora", "ming_moe"]


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


@pytest.mark.parametrize("problem", PROBLEMS, ids=["vector", "image"])
@pytest.mark.parametrize("name", SHARED)
def test_shared_adapters_are_hard_sharing_with_one_representation(device, name, problem):
    model = build(name, problem).to(device)
    x = torch.randn(4, *problem.input_shape, device=device)
    outputs = model(x)
    assert all(torch.equal(outputs[t], out) for t, out in model.decode(model.encode(x)).items())
    heads = {t: {id(p) for p in model.heads[t].parameters()} for t in problem.tasks}
    for task in problem.tasks:
        assert {id(p) for p in model.task_specific_parameters(task)} == heads[task]
        model.zero_grad(set_to_none=True)
        model(x)[task].sum().backward()
        reached = {id(p) for p in model.parameters() if p.grad is not None}
        others = set().union(*(heads[t] for t in problem.tasks if t != task))
        assert heads[task] <= reached and not reached & others
        assert any(n.startswith("layers.") and p.grad is not None for n, p in model.named_parameters())


def through_layers(model, x, *task):
    """Each wrapped layer in turn, a ReLU after every one (the last included)."""
    for layer in model.layers:
        x = torch.relu(layer(x, *task))
    return x


@pytest.mark.parametrize("problem", PROBLEMS, ids=["vector", "image"])
@pytest.mark.parametrize("name", ADAPTED + SHARED)
def test_layers_run_in_turn_with_a_relu_after_each_then_the_task_head(device, name, problem):
    torch.manual_seed(0)
    model = build(name, problem, depth=3).to(device)
    assert len(model.layers) == 3  # one wrapped layer per trunk layer
    x = torch.randn(4, *problem.input_shape, device=device)
    out = model(x)
    for t in problem.tasks:
        features = through_layers(model, x, t) if name in ADAPTED else through_layers(model, x)
        torch.testing.assert_close(out[t], model.heads[t](features))
    assert len(build(name, problem, depth=1).layers) == 1
