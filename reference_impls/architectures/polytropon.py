"""Polytropon: an inventory of low-rank skills, and a learned task-skill allocation matrix.

Ponti, Sordoni, Bengio, Reddy, "Combining Modular Skills in Multitask Learning",
arXiv:2202.13914 (2022).

Every task is assumed to need a subset of a small inventory of S latent skills. A skill is a
parameter-efficient change of a shared network: here, as in the paper's main variant, a
LoRA-style low-rank pair (A_s, B_s) on each weight layer. A binary task-skill allocation
matrix Z (tasks x skills) says which skills a task uses, and the task's layer is instantiated
with the *average* of its active skills' parameters (Eq. (3)):

    w_t = z_t / (sum_s z_ts + eps),     A_t = sum_s w_ts A_s,     B_t = sum_s w_ts B_s
    h   = W0 x + (1 / r) B_t A_t x                                      Eq. (6)

Eq. (3) averages the skills' flattened parameters and Eq. (6) writes the layer as
W0 + z^T AB; like the authors' code we average A and B separately (tested), and take eps
and the 1/r scale from that code. Z is learned by gradient descent through a continuous
relaxation, Eq. (2): each z_ts is a relaxed Bernoulli (Gumbel-sigmoid, temperature 1)
sample with a learned logit in training and sigmoid(logit) at evaluation, so z_ts lies in
[0, 1] and the normalised rows lie on the simplex (tested). A one-hot row makes the task use
exactly one skill (tested); an all-equal row shares every skill equally. Every layer of the backbone has its own skills and allocation logits; A starts
uniform and B at zero, so the untrained model is the backbone (tested), and the logits start
near 0 (allocation probability 1/2).

Relaxed samples come from a CPU ``torch.Generator`` (seed ``seed``), so they do not depend on
the device. Equation numbers are those of the paper copy the authors keep in their repository
(McGill-NLP/polytropon, media/paper.pdf, built 2022-03-01, the day after arXiv v1); later
arXiv versions were not checked.

Left out: the pretrained T5/BART backbones and BabyAI agents (the backbone here is a small
random trunk, frozen by default as in the paper's few-shot adaptation), the Indian Buffet
Process prior on Z (Eq. (4)), the two-speed learning rate for Z, the sparse-skill variant
(Eq. (5)) and few-shot adaptation to new tasks (a new row of Z). The authors' code gives skills only to the
attention projections (here every layer has them), draws A from U(±1/sqrt(3 d_in)) (here
the bound is 1/sqrt(d_in), nn.Linear's Kaiming-uniform with a = sqrt(5)), draws the relaxed
Bernoulli routing sample per example (here one per task per forward pass), and defaults to
rank 16 (McGill-NLP/polytropon at d567ea8).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import backbone_layers, heads_for, trunk_for
from .registry import Problem


def relaxed_bernoulli(logits: Tensor, generator: torch.Generator, tau: float = 1.0) -> Tensor:
    """Gumbel-sigmoid sample in (0, 1) whose hard version is Bernoulli(sigmoid(logits))."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)


def normalise_rows(z: Tensor, eps: float = 1e-12) -> Tensor:
    """Each row divided by its sum: the weights of the skill average."""
    return z / (z.sum(-1, keepdim=True) + eps)


class SkilledLayer(nn.Module):
    """A shared ``nn.Linear`` / ``nn.Conv2d`` W0 plus S low-rank skills and per-task allocation logits."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, num_tasks: int, num_skills: int, rank: int):
        super().__init__()
        require_positive(num_skills=num_skills, rank=rank)
        self.base, self.rank = layer, rank
        if isinstance(layer, nn.Linear):
            a_shape, b_shape = (rank, layer.in_features), (layer.out_features, rank)
        else:
            a_shape = (rank, layer.in_channels, *layer.kernel_size)
            b_shape = (layer.out_channels, rank, 1, 1)
        fan_in = torch.Size(a_shape[1:]).numel()
        self.skills_a = nn.Parameter(torch.empty(num_skills, *a_shape).uniform_(-fan_in**-0.5, fan_in**-0.5))
        self.skills_b = nn.Parameter(torch.zeros(num_skills, *b_shape))  # B = 0: starts as W0
        self.logits = nn.Parameter(torch.empty(num_tasks, num_skills).uniform_(-1e-3, 1e-3))  # Z's logits

    def skill_weights(self, task: int, generator: torch.Generator | None) -> Tensor:
        """Normalised row of Z for ``task``: relaxed sample with a generator, else sigmoid(logits)."""
        logits = self.logits[task]
        z = torch.sigmoid(logits) if generator is None else relaxed_bernoulli(logits, generator)
        return normalise_rows(z)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        a = torch.einsum("s,s...->...", weights, self.skills_a)  # A_t: the average of the skills' A
        b = torch.einsum("s,s...->...", weights, self.skills_b)  # B_t: the average of the skills' B
        if isinstance(self.base, nn.Linear):
            delta = F.linear(F.linear(x, a), b)
        else:
            delta = F.conv2d(F.conv2d(x, a, None, self.base.stride, self.base.padding), b)
        return self.base(x) + delta / self.rank


class Polytropon(MultiTaskModel):
    """A (frozen) backbone whose layers carry S low-rank skills mixed per task, then task heads."""

    name = "polytropon"
    equations_checked_in = "McGill-NLP/polytropon, media/paper.pdf"

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module],
                 num_skills: int = 4, rank: int = 2, freeze_backbone: bool = True, seed: int = 0):
        super().__init__(tasks)
        layers = backbone_layers(backbone, freeze_backbone, purpose="give skills to")
        self.layers = nn.ModuleList(SkilledLayer(m, len(self.tasks), num_skills, rank) for m in layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kwargs: object) -> "Polytropon":
        backbone = trunk_for(problem.input_shape, width, depth)  # stand-in for a pretrained network
        return cls(problem.tasks, backbone, heads_for(problem, width), **kwargs)

    def allocation(self) -> list[Tensor]:
        """Per layer, the normalised (tasks x skills) matrix used in eval mode; rows sum to one."""
        return [normalise_rows(torch.sigmoid(layer.logits)) for layer in self.layers]

    def features(self, x: Tensor, task: str) -> Tensor:
        t, generator = self.tasks.index(task), self.generator if self.training else None
        for layer in self.layers:
            x = torch.relu(layer(x, layer.skill_weights(t, generator)))
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Z's logits are one tensor per layer (rows per task), so they count as shared here
        yield from self.heads[task].parameters()
