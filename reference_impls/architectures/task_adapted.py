"""A shared backbone whose every layer is wrapped with added parameters, then one head per task.

Two shapes share this file. Per task (:class:`TaskAdaptedBackbone`): LoRA, MTL-LoRA,
residual adapters (series and parallel) and Piggyback's masks, where each task reads the same
(usually frozen) layers through additions of its own. Shared (:class:`SharedAdaptedBackbone`):
HydraLoRA and MING-MoE, whose additions every task reads alike, so the model is hard
parameter sharing with ``encode``/``decode``. Only the wrapped layer differs between the
models, so each of those files defines its layer and builds the model here. Neither class is
an architecture itself: they have no ``name`` and are not registered.
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
    """What a per-task wrapped layer offers: a forward pass for one task, and that task's parameters."""

    def __call__(self, x: Tensor, task: str) -> Tensor: ...

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]: ...


class _AdaptedBackbone(MultiTaskModel):
    """The wrapped ``layers`` and one head per task; the default model wraps a small trunk."""

    def __init__(self, tasks: Sequence[str], layers: Iterable[nn.Module], heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: object) -> "_AdaptedBackbone":
        backbone = trunk_for(problem.input_shape, width, depth)  # stand-in for a pretrained network
        return cls(problem.tasks, backbone, heads_for(problem, width), **kw)


class TaskAdaptedBackbone(_AdaptedBackbone):
    """``layers`` applied in turn for one task with a ReLU after each, then ``heads[task]``."""

    def __init__(self, tasks: Sequence[str], layers: Iterable[TaskAdaptedLayer], heads: Mapping[str, nn.Module]):
        super().__init__(tasks, layers, heads)

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


class SharedAdaptedBackbone(_AdaptedBackbone):
    """``layers`` applied in turn with a ReLU after each, the same for every task, then the heads."""

    def encode(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
