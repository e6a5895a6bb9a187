"""No task's output depends on a parameter another task claims as its own.

Gradient methods treat ``task_specific_parameters(t)`` as reached by task t's loss only and
balance the rest; a parameter claimed by task b that task a's output reads is balanced as
nobody's (PaLoRA and LORPMAN claimed adapters every task reads). Three tasks, so a claim can
also be wrong for the third; float64 and weights drawn at random (not a zero-initialised
up-projection) so a real dependency shows as a non-zero gradient.
"""

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build

from .conftest import accepted

PROBLEMS = {
    "vector": (Problem(("a", "b", "c"), (12,), {"a": 2, "b": 1, "c": 1}), (4, 12)),
    "dense": (Problem(("a", "b", "c"), (3, 8, 8), {"a": 2, "b": 1, "c": 1}, dense=True), (4, 3, 8, 8)),
}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Add noise to every parameter: zero-initialised paths (LoRA's B) would hide a dependency."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", available())
def test_no_task_reaches_another_tasks_parameters(name):
    for problem, shape in accepted(name, PROBLEMS).values():
        torch.manual_seed(0)
        model = perturbed(build(name, problem).double())
        names = {id(p): n for n, p in model.named_parameters()}
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for task in problem.tasks:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(2)  # the same sampled routes for every task's pass
            model(x)[task].square().sum().backward()
            reached = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            for other in problem.tasks:
                if other != task:
                    claimed = {id(p) for p in model.task_specific_parameters(other)}
                    assert not reached & claimed, (
                        f"{name}: task {task} reaches {other}'s {sorted(names[i] for i in reached & claimed)[:3]}")
