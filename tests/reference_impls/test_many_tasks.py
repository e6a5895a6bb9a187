"""Every architecture serves ten tasks, or refuses them with a reason, when it is built.

The other tests use two or three tasks. With eleven (QM9's targets) BMTAS enumerated 11^11
joint choices in its first step and was killed at 24 GB, and with 40 (CelebA) several models
kept a copy of shared activations per task. Ten tasks, each with its own output width, on
vectors and on 8 x 8 images: every task gets an output of its width for every example, and
the summed loss gives every task's output a finite gradient.
"""

from __future__ import annotations

import pytest
import torch

from reference_impls import train
from reference_impls.architectures import registry
from reference_impls.architectures.registry import Problem

from .conftest import DEVICES

TASKS = tuple(f"t{k}" for k in range(10))
PROBLEMS = {"vector": Problem(TASKS, (12,), {t: 1 + k % 3 for k, t in enumerate(TASKS)}),
            "dense": Problem(TASKS, (3, 8, 8), {t: 1 + k % 3 for k, t in enumerate(TASKS)}, dense=True)}


@pytest.mark.parametrize("name", registry.available())
@pytest.mark.parametrize("kind", sorted(PROBLEMS))
@pytest.mark.parametrize("device", DEVICES)
def test_ten_tasks_each_get_an_output_and_a_gradient_or_are_refused(name, kind, device):
    problem = PROBLEMS[kind]
    torch.manual_seed(0)
    try:
        model = registry.build(name, problem, **train.seeded(name, {}, 0)).to(device).train()
    except ValueError as refusal:
        assert str(refusal), "a refusal says why"
        return
    outputs = model(torch.randn(4, *problem.input_shape, device=device))
    assert set(outputs) == set(TASKS)
    for task, output in outputs.items():
        assert output.shape[:2] == (4, problem.out_dims[task]), task
        output.retain_grad()
    sum((output.float() - 1).square().mean() for output in outputs.values()).backward()  # 0 outputs too
    for task, output in outputs.items():
        assert output.grad is not None and torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0, task
