"""MTLoRA: task-agnostic LoRA inside every stage, task-specific LoRA at each stage's end.

Agiza, Neseem, Reda, "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024, arXiv:2403.20320.

A pretrained hierarchical backbone is frozen and adapted with two kinds of LoRA modules:

  TA-LoRA  (task-agnostic) on the layers of the shared path: W0 x + s B A x, trained by
           every task's loss, it carries what the tasks have in common;
  TS-LoRA  (task-specific) on the last layer of every stage: besides the shared output,
           that layer also emits one feature per task, W0 x + s B_t A_t x, from the same
           frozen W0 and the task's own low-rank pair.

The shared path continues into the next stage, while each task collects its own
stage-end features from all stages; they are fused per task (here a 1x1 / linear map of
their concatenation in stage order, the stand-in for the paper's multi-scale fusion) and read by the
task's decoder. So task t's output depends on the TA-LoRA modules, its own TS-LoRA modules,
fusion and head, and on nothing of another task (tested). The task feature uses W0 plus
the task's pair only, as in the official code's default ("matrix") mode (tested by hand).
The last stage's shared output feeds nothing, so its final layer carries only TS-LoRA.

Every pair is scaled by s = α / r, as in LoRA; the default α = r gives s = 1 (tested by hand).
The official code (scale-lab/MTLoRA) uses plain multipliers instead, 2.0 for the shared and
4.0 for the task pairs in every released configuration, with ranks 64 (shared) and 4 (task),
LoRA dropout 0.05, and keeps the patch embedding, relative-position biases and patch merging
trainable besides the norms; where task-specific layers are chained, its frozen weight reads
the shared stream and only the low-rank term the task's.
All B start at zero, so at initialisation every task's stage-end feature equals the
frozen backbone's (tested). Like :mod:`.lora`, convolutions are adapted as a k x k
down-projection and a 1x1 up-projection.

Left out: the pretrained Swin transformer and its patch merging between stages (the
stages here are groups of equal-width layers of a small frozen trunk, so the features
have one resolution), MTLoRA+'s LoRA on patch merging, the unfrozen normalisation layers
and the HRNet-style decoder. Equation numbers are not quoted: we could not check them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, backbone_layers, heads_for, trunk_for
from .lora import low_rank_pair
from .registry import Problem


class StageLayer(nn.Module):
    """A frozen layer W0 with an optional TA-LoRA pair and optional TS-LoRA pairs per task."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, scale: float,
                 shared: bool, task_specific: Sequence[str] = ()):
        super().__init__()
        require_positive(rank=rank)
        self.base = layer
        self.scale = scale
        self.agnostic = nn.ModuleList(low_rank_pair(layer, rank)) if shared else None  # TA-LoRA [A, B]
        pairs = {t: nn.ModuleList(low_rank_pair(layer, rank)) for t in task_specific}
        self.specific = nn.ModuleDict(pairs)  # TS-LoRA [A_t, B_t]

    def shared(self, x: Tensor) -> Tensor:
        down, up = self.agnostic
        return torch.relu(self.base(x) + self.scale * up(down(x)))

    def task(self, x: Tensor, task: str) -> Tensor:
        down, up = self.specific[task]
        return torch.relu(self.base(x) + self.scale * up(down(x)))


class MTLoRA(MultiTaskModel):
    """Frozen trunk in stages; TA-LoRA on the shared path, TS-LoRA per task at stage ends."""

    name = "mtlora"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        width: int,
        stages: int = 2,
        rank: int = 4,
        alpha: float | None = None,
        freeze_backbone: bool = True,
    ):
        super().__init__(tasks)
        require_positive(rank=rank)
        layers = backbone_layers(backbone)
        if stages < 1 or len(layers) % stages:
            raise ValueError(f"{len(layers)} backbone layers cannot be split into {stages} equal stages")
        if freeze_backbone:
            backbone.requires_grad_(False)
        scale = (float(rank) if alpha is None else alpha) / rank
        per_stage = len(layers) // stages
        self.stages = nn.ModuleList()
        for s in range(stages):
            group = layers[s * per_stage:(s + 1) * per_stage]
            last_stage = s == stages - 1
            self.stages.append(nn.ModuleList(
                StageLayer(m, rank, scale, shared=not (last_stage and i == per_stage - 1),
                           task_specific=self.tasks if i == per_stage - 1 else ())
                for i, m in enumerate(group)
            ))
        self.fusion = nn.ModuleDict({t: ChannelLinear(stages * width, width) for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, stages: int = 2, layers_per_stage: int = 2,
                     **kw: object) -> "MTLoRA":
        require_positive(layers_per_stage=layers_per_stage, stages=stages)
        backbone = trunk_for(problem.input_shape, width, stages * layers_per_stage)  # "pretrained" stand-in
        return cls(problem.tasks, backbone, heads_for(problem, width), width, stages, **kw)

    def stage_features(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Each task's TS-LoRA feature at the end of every stage."""
        collected: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        for stage in self.stages:
            for layer in stage[:-1]:
                x = layer.shared(x)  # TA-LoRA
            end = stage[-1]
            for t in self.tasks:
                collected[t].append(end.task(x, t))  # TS-LoRA
            if end.agnostic is not None:
                x = end.shared(x)  # the shared path goes on to the next stage
        return collected

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.stage_features(x)
        return {t: self.heads[t](self.fusion[t](torch.cat(features[t], dim=1))) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for stage in self.stages:
            yield from stage[-1].specific[task].parameters()
        yield from self.fusion[task].parameters()
        yield from self.heads[task].parameters()
