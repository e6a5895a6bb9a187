"""MTL-NAS: search which cross-task fusion edges to add between fixed single-task backbones.

Gao, Bai, Jie, Ma, Jia, Liu, "MTL-NAS: Task-Agnostic Neural Architecture Search towards
General-Purpose Multi-Task Learning", CVPR 2020, arXiv:2003.14058 (official code:
github.com/bhpfelix/MTLNAS).

Every task keeps its own single-task backbone. The search space is task-agnostic: after stage
l of task t's column, an edge may bring in the stage-j output of another task's column for any
j <= l (hierarchical and layer-wise fusion, Eq. (1)). The kept inputs are concatenated with
the column's own feature and fused by an NDDR-style 1x1 convolution followed by a ReLU
(Eq. (2), without its batch norm),

    x_t,l <- ReLU( W_t,l [x_t,l ; c_e x_s,j for every candidate edge e = (s, j)] ),

where W_t,l starts as (0.9 I, 0.1 I / m, ..., 0.1 I / m) for m candidate edges, so inserting
the edges barely changes the pretrained columns at first (tested by hand); the paper's
initialisation is the block row [w_TI I, w_TO I, ..., w_TO I] printed on p. 4 as "(3)", a
number it gives the search objective too. Each edge's gate c_e comes from an architecture
logit: sigmoid(logit) (the deterministic relaxation, Eq. (5)) or a relaxed-Bernoulli
(Gumbel-sigmoid) sample in training (Eqs. (6), (8)), and the hard 0/1 decision logit > 0,
i.e. sigmoid(logit) > 0.5, at evaluation (Eqs. (9)-(10)). A minimum-entropy regulariser, the
mean Bernoulli entropy of the edge gates (:meth:`MTLNAS.entropy_loss`; the gamma term of
Eqs. (12)-(13)), pushes every gate to 0 or 1 during the search, so the searched network can
be used as is without retraining (its maximum log 2 at 1/2 and zero limit at 0/1 are
tested). :meth:`MTLNAS.auxiliary_loss` is ``entropy_weight`` times that entropy, which the
training harness adds to the task losses every step; the default weight, 0.1, is ours (the
paper sets gamma = 10, Sec. 5.1, as do the official configurations: their entropy period
(0, 0) makes it 0 at step 0 and 10 from step 1; only an unused default would ramp it), and 0
turns the regulariser off. Also in the official search (bhpfelix/MTLNAS at bf171b1): the
fusion weights start at (1, 0), gates are Gumbel samples when the weights train and plain
sigmoids when the edge logits do, edges reach back at most 3 layers within a VGG stage, and
the fusion layers get 100 times the learning rate.

The official code searches two tasks; this version takes any number and treats every other
task's column as a source.

Equation numbers are those of the copy on the first author's site
(ethanygao/ethanygao.github.io, pdf/CVPR2020 - MTL-NAS.pdf, built 2020-03-31, the day of
arXiv v1).

Left out: the VGG-16 / DeepLab backbones and their pretraining, batch normalisation in the
fusion, the depth-limited connectivity pattern, temperature and regulariser schedules, the
optional L1 cost term, and the separate architecture optimiser.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_non_negative
from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for
from .gumbel_matrix_routing import gumbel_sigmoid
from .registry import Problem


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of Bernoulli gates with the given logits; 0 when there are none
    (a single task has no candidate edges, and the mean of nothing would be NaN)."""
    p = torch.sigmoid(logits)
    entropy = nn.functional.softplus(logits) - p * logits  # = -p log p - (1-p) log(1-p)
    return entropy.sum() / max(logits.numel(), 1)


def nddr_fusion(width: int, num_sources: int, init: tuple[float, float] = (0.9, 0.1)) -> ChannelLinear:
    """1x1 fusion of the own feature and ``num_sources`` others, initialised near the identity."""
    fuse = ChannelLinear(width * (1 + num_sources), width, bias=False)
    eye = torch.eye(width)
    blocks = [eye * init[0]] + [eye * init[1] / max(num_sources, 1)] * num_sources
    with torch.no_grad():
        fuse.weight.copy_(torch.cat(blocks, dim=1))
    return fuse


class MTLNAS(MultiTaskModel):
    """One column per task; after each stage, gated fusion edges from other columns' stages <= l."""

    name = "mtl_nas"
    equations_checked_in = "ethanygao/ethanygao.github.io, pdf/CVPR2020 - MTL-NAS.pdf"

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, width: int, heads: Mapping[str, nn.Module],
                 hard: bool = True, tau: float = 1.0, seed: int = 0, entropy_weight: float = 0.1):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_non_negative(entropy_weight=entropy_weight)
        self.entropy_weight = entropy_weight
        self.columns = nn.ModuleDict({t: copy.deepcopy(backbone) for t in self.tasks})
        self.num_stages = len(backbone.blocks)
        k = len(self.tasks)
        # stage l of task t reads (k - 1) * (l + 1) candidate edges
        self.fusions = nn.ModuleDict({
            t: nn.ModuleList(nddr_fusion(width, (k - 1) * (l + 1)) for l in range(self.num_stages)) for t in self.tasks
        })
        self.edge_logits = nn.ParameterDict({
            t: nn.Parameter(torch.zeros((k - 1) * self.num_stages * (self.num_stages + 1) // 2)) for t in self.tasks
        })
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.hard, self.tau = hard, tau
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, **kwargs: object) -> "MTLNAS":
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), width,
                   heads_for(problem, width), **kwargs)

    def sources(self, task: str, stage: int) -> list[tuple[str, int]]:
        """Candidate edges into ``task`` after ``stage``: (other task, its stage j <= stage)."""
        return [(s, j) for j in range(stage + 1) for s in self.tasks if s != task]

    def gates(self, task: str) -> Tensor:
        """c_e for every candidate edge into ``task``: relaxed in training, 0/1 in evaluation."""
        logits = self.edge_logits[task]
        if not self.training:
            return (logits > 0).to(logits)
        if self.hard:
            return gumbel_sigmoid(logits, self.tau, self.generator)
        return torch.sigmoid(logits)

    def entropy_loss(self) -> Tensor:
        """The minimum-entropy regulariser: mean Bernoulli entropy of every edge gate."""
        return bernoulli_entropy(torch.cat([self.edge_logits[t] for t in self.tasks]))

    def auxiliary_loss(self) -> Tensor:
        """``entropy_weight`` x :meth:`entropy_loss`, added to the task losses by the training harness."""
        return self.entropy_weight * self.entropy_loss()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        gates = {t: self.gates(t) for t in self.tasks}
        offset = {t: 0 for t in self.tasks}
        h = {t: x for t in self.tasks}
        history: dict[tuple[str, int], Tensor] = {}
        for l in range(self.num_stages):
            raw = {t: self.columns[t].blocks[l](h[t]) for t in self.tasks}
            history.update({(t, l): raw[t] for t in self.tasks})  # sources are the unfused stage outputs
            for t in self.tasks:
                src = self.sources(t, l)
                c = gates[t][offset[t]: offset[t] + len(src)]
                offset[t] += len(src)
                inputs = [raw[t]] + [c_e * history[e] for c_e, e in zip(c, src)]
                h[t] = torch.relu(self.fusions[t][l](torch.cat(inputs, dim=1)))
        return {t: self.heads[t](h[t]) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Columns, earlier fusions and the edge logits feed other tasks through open edges; the
        # last fusion of the task's column feeds only its head.
        yield from self.fusions[task][-1].parameters()
        yield from self.heads[task].parameters()
