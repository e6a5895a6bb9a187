"""PackNet: tasks packed one after another into disjoint subsets of one set of weights.

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative
Pruning", CVPR 2018, arXiv:1711.05769.

Tasks arrive in a fixed order (``tasks``). Every weight of the shared layers has an
owner: the (1-based) index of the task it belongs to, or 0 when it is free. The first
task starts out owning every weight. For each task ``t`` in turn the paper's procedure
(its method section, checked against the official code) is

1. :meth:`start_task` (from the second task on): every free weight is handed to ``t``;
2. train ``t``; gradients reach only the weights ``t`` owns, the weights of tasks
   ``< t`` are used but stay fixed;
3. :meth:`prune`: in each layer, release the ``fraction`` of ``t``'s weights with the
   smallest magnitude (set them to 0 and free them for later tasks); then
   (optionally) retrain ``t`` briefly on the weights it kept.

Task ``t`` predicts with the weights owned by tasks ``1..t`` and zero elsewhere, so its
output never changes once later tasks train (tested): the owner masks are disjoint and
each task's view is the union of its own and its predecessors'. Biases are trained with
the first task only and fixed afterwards (the official code's default for added tasks);
every task has its own head.

Gradient masking is done in the forward pass (frozen entries are detached), so a frozen
weight gets an exact zero gradient. Use a fresh optimiser per task and no weight decay:
momentum or decay left over from an earlier task would still move frozen weights.
:meth:`forward` returns every task's output, each through its own view of the weights.

Left out: the ImageNet-pretrained VGG/ResNet backbone the paper packs into, its
batch-norm handling and its specific pruning ratios and retraining schedules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import backbone_layers, conv_geometry, heads_for, run_layer, trunk_for
from .registry import Problem


class PackedLayer(nn.Module):
    """A linear or convolution layer whose weights each carry an owning task index."""

    def __init__(self, layer: nn.Linear | nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.geometry = conv_geometry(layer)
        self.register_buffer("owner", torch.ones_like(self.weight, dtype=torch.long))  # task 1 owns all

    def visible(self, k: int) -> Tensor:
        """Weights task ``k`` predicts with: those owned by tasks 1..k."""
        return (self.owner >= 1) & (self.owner <= k)

    def forward(self, x: Tensor, k: int, training_k: int) -> Tensor:
        w = torch.where(self.owner == training_k, self.weight, self.weight.detach())  # gradient masking
        w = w * self.visible(k)
        b = self.bias if self.bias is None or training_k == 1 else self.bias.detach()  # fixed after task 1
        return run_layer(self.geometry, x, w, b)

    @torch.no_grad()
    def release_smallest(self, k: int, fraction: float) -> None:
        """Free the ``fraction`` of task ``k``'s weights with the smallest magnitude."""
        owned = (self.owner == k).flatten().nonzero().squeeze(1)
        n_release = round(fraction * owned.numel())
        order = self.weight.flatten()[owned].abs().argsort()
        released = owned[order[:n_release]]
        self.owner.view(-1)[released] = 0
        self.weight.view(-1)[released] = 0.0


class PackNet(MultiTaskModel):
    """Shared layers with per-weight task ownership, plus one head per task."""

    name = "packnet"
    training_procedure = "tasks are trained one after another, with start_task() before each and prune() after"

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        layers = backbone_layers(backbone, purpose="pack")
        self.layers = nn.ModuleList(PackedLayer(m) for m in layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.training_index = 1  # the task being trained; the first one owns every weight

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2) -> "PackNet":
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), heads_for(problem, width))

    def index(self, task: str) -> int:
        return self.tasks.index(task) + 1

    def start_task(self, task: str) -> None:
        """Hand every free weight to ``task``, which must be the next task in order."""
        k = self.index(task)
        if k != self.training_index + 1:
            raise ValueError(f"tasks are packed in order {self.tasks}; the next one is not {task!r}")
        for layer in self.layers:
            layer.owner[layer.owner == 0] = k
        self.training_index = k

    def prune(self, task: str, fraction: float) -> None:
        """Release ``fraction`` of ``task``'s weights, smallest magnitudes first, in every layer."""
        if self.index(task) != self.training_index:
            raise ValueError(f"only the task being trained ({self.tasks[self.training_index - 1]!r}) can be pruned")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        for layer in self.layers:
            layer.release_smallest(self.training_index, fraction)

    def masks(self, task: str) -> list[Tensor]:
        """Per layer, the boolean mask of the weights ``task`` owns."""
        return [layer.owner == self.index(task) for layer in self.layers]

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        k = self.index(task)
        for layer in self.layers:
            x = torch.relu(layer(x, k, self.training_index))
        return self.heads[task](x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # The weight tensors are shared objects; ownership is per entry, not per parameter.
        return self.heads[task].parameters()
