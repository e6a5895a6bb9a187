"""PS-MCNN: task-specific networks and one shared network that trade features at every stage.

Cao, Li, Zhang, "Partially Shared Multi-Task Convolutional Neural Network with Local
Constraint for Face Attribute Learning", CVPR 2018 (no arXiv version).

Instead of a shared trunk that forks, PS-MCNN runs T task-specific networks (TSNets) side
by side with one shared network (SNet), all of the same depth, joined at every stage by the
"partially shared" structure (the paper's Sec. 3.1):

* SNet's stage l + 1 reads the concatenation of SNet's and every TSNet's stage-l outputs,
  so the shared representation is assembled from all tasks;
* TSNet t's stage l + 1 reads the concatenation of its own stage-l output and SNet's,
  so a task sees the other tasks only through SNet;
* task t's head reads TSNet t's last stage next to SNet's last stage.

So task B's network reaches task A only through SNet, one stage late: B's last stage feeds
no one but B (tested), which is why it and B's head are B's only task-specific parameters.
The "local constraint" (PS-MCNN-LC, Sec. 3.2) uses face identities: it pulls a sample's
representation towards those of its nearest neighbours that show the same person
(:func:`local_constraint`), added to the attribute losses with a weight. It needs identity
labels, which the repository's task data do not have, so the training harness trains the
paper's plain PS-MCNN (no local constraint); a caller with identities adds
``weight * local_constraint(features, identities)`` to the loss itself.

Left out: the paper's stage widths and its four attribute groups (here any number of tasks,
one TSNet each), and the neighbour search over the whole training set (neighbours are
sought within the batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import conv_block, head_for, mlp_block
from .registry import Problem


def _block(input_shape: Sequence[int], in_width: int, out_width: int) -> nn.Module:
    return mlp_block(in_width, out_width) if len(input_shape) == 1 else conv_block(in_width, out_width)


class PartiallySharedMCNN(MultiTaskModel):
    """``depth`` stages of one SNet block and one TSNet block per task, joined by concatenation."""

    name = "ps_mcnn"

    def __init__(
        self, problem: Problem, depth: int = 2, task_width: int = 16, shared_width: int = 16,
    ):
        super().__init__(problem.tasks)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        shape, n = problem.input_shape, len(problem.tasks)
        first = shape[0]
        self.snet = nn.ModuleList(
            _block(shape, first if l == 0 else shared_width + n * task_width, shared_width) for l in range(depth)
        )
        self.tsnets = nn.ModuleDict({
            t: nn.ModuleList(
                _block(shape, first if l == 0 else task_width + shared_width, task_width) for l in range(depth)
            )
            for t in self.tasks
        })
        self.heads = nn.ModuleDict({
            t: head_for(shape, task_width + shared_width, problem.task_out_dims[t], problem.dense)
            for t in self.tasks
        })

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2) -> "PartiallySharedMCNN":
        return cls(problem, depth, task_width=max(1, width // 2), shared_width=width)

    def representations(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """SNet's and each TSNet's last-stage outputs."""
        shared = self.snet[0](x)
        own = {t: self.tsnets[t][0](x) for t in self.tasks}
        for l in range(1, len(self.snet)):
            new_shared = self.snet[l](torch.cat([shared, *own.values()], dim=1))  # all tasks -> SNet
            own = {t: self.tsnets[t][l](torch.cat([own[t], shared], dim=1)) for t in self.tasks}  # SNet -> t
            shared = new_shared
        return shared, own

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared, own = self.representations(x)
        return {t: self.heads[t](torch.cat([own[t], shared], dim=1)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.tsnets[task][-1].parameters()  # earlier stages also feed SNet
        yield from self.heads[task].parameters()


def local_constraint(features: Tensor, identities: Tensor, k: int = 1) -> Tensor:
    """Mean squared distance from each sample to its ``k`` nearest same-identity neighbours.

    Samples with no other image of their identity in the batch contribute nothing.
    """
    f = features.flatten(1)
    dist = torch.cdist(f, f).square()
    same = identities[:, None] == identities[None, :]
    same.fill_diagonal_(False)
    dist = dist.masked_fill(~same, torch.inf)
    k = min(k, f.shape[0] - 1) if f.shape[0] > 1 else 0
    if k == 0:
        return f.sum() * 0.0
    nearest = dist.topk(k, dim=1, largest=False).values
    finite = torch.isfinite(nearest)
    return nearest[finite].sum() / finite.sum().clamp_min(1)
