"""A shared backbone whose every layer is wrapped per task, then one head per task.

LoRA, MTL-LoRA, residual adapters (series and parallel) and Piggyback's masks have this
shape: each task reads the same (usually frozen) layers through additions of its own.
Only the wrapped layer differs, so each of those files defines its layer and builds
the model here. Not an architecture itself: it has no ``name`` and is not registered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


class TaskAdaptedLayer(Protocol):
    """What a wrapped layer offers: a forward pass for one task, and that task's parameters."""

    def __call__(self, x: Tensor, task: str) -> Tensor: ...

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]: ...


class TaskAdaptedBackbone(MultiTaskModel):
    """``layers`` applied in turn for one task with a ReLU after each, then ``heads[task]``."""

    def __init__(self, tasks: Sequence[str], layers: Iterable[TaskAdaptedLayer], heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: object) -> "TaskAdaptedBackbone":
        backbone = trunk_for(problem.input_shape, width, depth)  # stand-in for a pretrained network
        return cls(problem.tasks, backbone, heads_for(problem, width), **kw)

    def features(self, x: Tensor, task: str) -> Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x, task))
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from layer.task_parameters(task)
        yield from self.heads[task].parameters()
