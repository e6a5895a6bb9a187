"""Cross-stitch networks: one network per task, mixed linearly after every block.

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016 (arXiv:1604.03539). Eq. (1) for two tasks A and B at location (i, j):

    [x~_A]   [a_AA  a_AB] [x_A]
    [x~_B] = [a_BA  a_BB] [x_B]

Eqs. (2)-(3) are its gradients, which autograd gives us. Here the unit is a learnable
T x T matrix per block, applied to whole feature tensors, and every task column reads the
mixed features. With the identity matrix the columns never exchange anything: the model is
T independent networks (tested).

Equation numbers were checked in a PDF-to-text transcript of arXiv:1604.03539v1 (12 April
2016) in the GitHub file index (index id 52709215474); it has three numbered equations.

Left out: per-channel units. The paper keeps one unit per channel for segmentation and
surface normals (Sec. 5) and one per activation map, as here, for detection and attributes,
where per-channel units trained unstably (Sec. 6). Also left out: the 10^2-10^3 times larger
learning rate the paper gives the alphas (Sec. 5.2), and initialising the columns from
single-task networks, which beat ImageNet initialisation there (Sec. 5.3). The paper places
units after pooling and fully connected layers (pool1, pool2, pool5, fc6, fc7 of AlexNet),
having found them better than after every convolution; here a unit follows every block,
the last included, so the heads read stitched features.
The paper's initialisations are convex two-task pairs (alpha_S, alpha_D), of which
(0.9, 0.1) did best (Table 1); for T > 2 the off-diagonal initial weight
(1 - self_weight)/(T - 1) generalises this so rows still sum to one; by default
alpha_S = 0.9. Convexity is only an initialisation: nothing keeps the alphas on the simplex.
LibMTL instead starts every alpha at 1, so each column first reads the plain sum of all columns.
LibMTL's Cross_stitch.py also places units only between its ResNet stages (after stages 1-3),
none after the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


def stitch_init(num_tasks: int, self_weight: float) -> Tensor:
    """alpha_S on the diagonal, the rest of each row spread evenly over the other tasks."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - self_weight) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), other) + (self_weight - other) * torch.eye(num_tasks)


class CrossStitch(MultiTaskModel):
    """T columns built by ``make_column()`` (each with ``.blocks``), stitched after each block."""

    name = "cross_stitch"
    equations_checked_in = "a PDF-to-text transcript of arXiv:1604.03539v1"

    def __init__(
        self,
        tasks: Sequence[str],
        make_column: Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        self_weight: float = 0.9,
    ):
        super().__init__(tasks)
        self.columns = nn.ModuleDict({t: make_column() for t in self.tasks})
        self.num_blocks = len(self.columns[self.tasks[0]].blocks)
        self.stitches = nn.ParameterList(
            nn.Parameter(stitch_init(len(self.tasks), self_weight)) for _ in range(self.num_blocks)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kw) -> "CrossStitch":
        heads = heads_for(problem, width)
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth), heads, **kw)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [x] * len(self.tasks)
        for j in range(self.num_blocks):
            features = [self.columns[t].blocks[j](f) for t, f in zip(self.tasks, features)]
            stacked = torch.stack(features)  # (T, B, C, ...)
            mixed = torch.einsum("ts,s...->t...", self.stitches[j], stacked)  # Eq. (1)
            features = list(mixed.unbind(0))
        return {t: self.heads[t](f) for t, f in zip(self.tasks, features)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Columns feed every task through the stitches, so only the heads are specific.
        return self.heads[task].parameters()
