"""DMTG: learn which of K encoder branches each task uses, in one run, with a Gumbel-softmax.

Gao, Jiang, Li, Yu, Xia, "DMTG: One-Shot Differentiable Multi-Task Grouping", ICML 2024,
arXiv:2407.05082 (official code: github.com/ethanygao/DMTG).

Grouping N tasks into at most K disjoint, possibly empty groups (Eq. (1)) is posed as pruning
a network that starts with every option present: K group branches after a shared stem, and
behind every branch one head per task (K x N heads). A learnable N x K logit matrix defines,
for each task, a categorical distribution over the branches (Eqs. (2)-(3)). During training
the assignment is sampled with the Gumbel-softmax (Eq. (5): a relaxed one-hot per task row;
or, not in the paper, a straight-through one-hot with ``hard=True``), so the grouping and the
weights are trained together in one shot; task t's term from branch k is weighted by its
assignment g[t, k] (the loss matrix times the assignment, Eqs. (4) and (6)). After training
each task keeps only the head on its most likely branch (argmax per row: evaluation mode
here), which prunes the K x N heads to N. Rows of the softmax are distributions and hard
samples follow them (both tested); with a hard assignment a branch is trained only by the
tasks assigned to it (tested).

The official code weights the K x N per-head losses by g; :meth:`DMTG.weighted_loss` does that.
``forward`` returns sum_k g[t, k] head_{k,t}(branch_k(stem(x))) so that plain training loops
work; with a one-hot g the two losses coincide in value, but not in their gradient with respect
to the assignment, so the training harness, which scores ``forward``, trains a mixture of the
heads rather than the paper's objective (:attr:`DMTG.training_procedure` says so).

Equation numbers are those of the ICML camera-ready copy on the first author's site
(ethanygao/ethanygao.github.io, pdf/ICML2024_dmtg.pdf). The paper starts every s_ik at 1/K;
ours start at 0, which Eq. (5) turns into the same uniform distribution.

Left out: the task-gradient regulators and entropy term of the official code's options (its
Gumbel-softmax temperature is a constant, 2.5 for CelebA and 4 for Taskonomy; ``tau`` = 1 here),
and the large backbones (ResNet, Xception, ViT) and data sets (CelebA, Taskonomy). The paper
uses the pruned groups and their weights as trained, without retraining (Sec. 3); the release
(ethanygao/DMTG at 71b5eed) also has a class for tuning the pruned groups one at a time
(models/learnToGroup.py: FineTuningGroup, with pruning() and group_parameters()), which its
test configs load (finetune: True) but none of its scripts trains; that step is not here either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator, hard: bool = False) -> Tensor:
    """Relaxed one-hot samples along the last dimension; straight-through one-hot if ``hard``."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9).to(logits)
    soft = torch.softmax((logits - (-u.log()).log()) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot + soft - soft.detach()


class DMTG(MultiTaskModel):
    """Shared stem, ``num_groups`` branches, a head per (branch, task), and an N x K assignment."""

    name = "dmtg"
    equations_checked_in = "ethanygao/ethanygao.github.io, pdf/ICML2024_dmtg.pdf"
    training_procedure = ("each of the K x N heads trains on its task's loss weighted by its Gumbel-softmax "
                          "assignment (weighted_loss(), which needs the losses); the groups are then pruned to "
                          "one head per task and used as trained")

    def __init__(self, tasks: Sequence[str], stem: nn.Module, branch: nn.Module, num_groups: int,
                 heads: Mapping[str, nn.Module], tau: float = 1.0, hard: bool = False, seed: int = 0):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_positive(num_groups=num_groups)
        self.stem = stem
        self.branches = nn.ModuleList(copy.deepcopy(branch) for _ in range(num_groups))
        # heads[k][t]: task t's head behind branch k (K x N heads before pruning)
        self.heads = nn.ModuleList(nn.ModuleDict({t: copy.deepcopy(heads[t]) for t in self.tasks})
                                   for _ in range(num_groups))
        self.group_logits = nn.Parameter(torch.zeros(len(self.tasks), num_groups))
        self.tau, self.hard = tau, hard
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same samples on every device

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_groups: int = 2, **kwargs: object) -> "DMTG":
        trunk = trunk_for(problem.input_shape, width, depth=2)
        return cls(problem.tasks, trunk.blocks[0], trunk.blocks[1], num_groups, heads_for(problem, width), **kwargs)

    def assignment_probabilities(self) -> Tensor:
        """softmax of each task's row: P(task t -> branch k), (N, K)."""
        return torch.softmax(self.group_logits, dim=-1)

    def assignment(self) -> Tensor:
        """g: Gumbel-softmax samples in training, the argmax one-hot (pruned network) in evaluation."""
        if self.training:
            return gumbel_softmax(self.group_logits, self.tau, self.generator, self.hard)
        return torch.zeros_like(self.group_logits).scatter(-1, self.group_logits.argmax(-1, keepdim=True), 1.0)

    def head_outputs(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Every (branch k, task t) head's prediction: a list over k of {t: output}."""
        z = self.stem(x)
        feats = [b(z) for b in self.branches]
        return [{t: heads[t](f) for t in self.tasks} for heads, f in zip(self.heads, feats)]

    def weighted_loss(self, x: Tensor, loss_of: Callable[[str, Tensor], Tensor]) -> Tensor:
        """sum_{t,k} g[t, k] loss_t(head_{k,t}(x)): the training objective of the official code."""
        outs, g = self.head_outputs(x), self.assignment()
        return sum(g[i, k] * loss_of(t, outs[k][t]) for i, t in enumerate(self.tasks) for k in range(len(outs)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs, g = self.head_outputs(x), self.assignment()
        return {t: sum(g[i, k] * outs[k][t] for k in range(len(outs))) for i, t in enumerate(self.tasks)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for heads in self.heads:
            yield from heads[task].parameters()
