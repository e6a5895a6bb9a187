"""NestedNet: n networks in one, each level's weights a superset of the level below.

Kim, Ahn & Oh, "NestedNet: Learning Nested Sparse Structures in Deep Neural Networks",
CVPR 2018, arXiv:1712.03781.

A nested sparse network has ``n`` levels. Level ``l`` computes with the masked weights
``W * M_l`` (the projection P_{Ω_M}(W) of Eqs. 2, 4 and 5), and the masks are nested,
``M_1 <= M_2 <= ... <= M_n`` (``M_n`` all ones; the subset constraint of Eq. 5), so
the core level is the sparsest network and every higher level contains all of its
parameters plus some more: the levels share parameters instead of owning copies (an
"n-in-1" network). The paper obtains the masks in three ways: weight connection learning
(unstructured sparsity, Eqs. 2-3), channel scheduling and layer scheduling (Eq. 4 for a
single schedule). This file implements channel scheduling: level ``l`` uses the first
``c_l`` channels of every hidden layer (``c_1 < ... < c_n``), so ``M_l`` keeps the rows
``< c_l`` and the columns ``< c_{l-1 layer}`` of each weight matrix, the leading block of
the block matrix of Eq. 6 (the input layer's channels are not scheduled, as there).
Levels can serve different tasks; the paper's multi-task use is coarse-to-fine
hierarchical classification, with the core level predicting the coarse classes and
higher levels the finer ones. Here task ``k`` (in order) is read at level ``k`` through
its own head on that level's channels, and the model is trained on the sum of the task
losses (Eq. 5 averages the levels' losses, a factor 1/n, and adds a regulariser λR on
the full-level weights, which is left out here), so weights in ``M_l`` but not in
``M_{l-1}`` only ever receive gradients from levels ``>= l`` (tested, as is that the core
level uses only core weights).

Equation numbers are those of the CVPR 2018 open-access copy (10 pages, printed pages
8669-8678) kept as files/nestednet.pdf of Chanho-Ahn/Chanho-Ahn.github.io (commit ad9fe7d).

Left out: weight connection learning (learned unstructured nested masks) and layer
scheduling, the ResNet / WRN backbones, and the compression and distillation experiments;
the channel schedule here is fixed (``c_l`` proportional to ``l``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import head_for, trunk_for
from .registry import Problem
from .splitnet import _apply, _weighted


def level_widths(width: int, levels: int) -> list[int]:
    """``c_l = width * l / levels`` channels for levels ``1..levels`` (strictly increasing).

    Each ``c_l`` is rounded to the nearest integer; every level needs at least one channel.
    """
    widths = [round(width * (l + 1) / levels) for l in range(levels)]
    if min(widths) < 1 or len(set(widths)) != levels:
        raise ValueError(f"width {width} is too small for {levels} nested levels")
    return widths


class NestedNet(MultiTaskModel):
    """One trunk of equal-width layers; task ``k`` runs the level-``k`` nested sub-network."""

    name = "nestednet"
    equations_checked_in = "files/nestednet.pdf of Chanho-Ahn/Chanho-Ahn.github.io"

    def __init__(self, tasks: Sequence[str], blocks: Sequence[nn.Sequential], widths: Sequence[int],
                 heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        if len(widths) != len(self.tasks) or list(widths) != sorted(set(widths)):
            raise ValueError("need one strictly increasing channel count per task (level)")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.widths = tuple(widths)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2) -> NestedNet:
        trunk = trunk_for(problem.input_shape, width, depth)
        widths = level_widths(width, len(problem.tasks))
        heads = {t: head_for(problem.input_shape, c, problem.out_dims[t], problem.dense)
                 for t, c in zip(problem.tasks, widths)}
        return cls(problem.tasks, list(trunk.blocks), widths, heads)

    def weight_masks(self, level: int) -> list[Tensor]:
        """``M_level`` for every layer: rows below ``c_level``, columns the previous layer's rows."""
        masks, used_inputs = [], None
        for block in self.blocks:
            out_channels, in_channels = _weighted(block).weight.shape[:2]
            rows = torch.arange(out_channels) < self.widths[level]
            cols = torch.ones(in_channels, dtype=torch.bool) if used_inputs is None else used_inputs
            masks.append(rows[:, None] & cols[None, :])
            used_inputs = rows
        return masks

    def level_features(self, x: Tensor, level: int) -> Tensor:
        """The trunk computed with ``W * M_level``; the first ``c_level`` channels."""
        for block, mask in zip(self.blocks, self.weight_masks(level)):
            x = _apply(block, x, mask.to(x.device))
        return x[:, : self.widths[level]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.level_features(x, k)) for k, t in enumerate(self.tasks)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Levels share the trunk's tensors (nested masks); only the heads belong to one task.
        return self.heads[task].parameters()
