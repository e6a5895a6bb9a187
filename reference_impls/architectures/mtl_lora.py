"""MTL-LoRA: a shared A, a task-specific r x r transform, shared up-projections mixed per task.

Yang, Muhtar, Shen, Zhan, Liu, Wang, Sun, Deng, Sun, Zhang, Chen, Tong, "MTL-LoRA:
Low-Rank Adaptation for Multi-Task Learning", AAAI 2025, arXiv:2410.09437.

Plain LoRA projects every task's input into the same r-dimensional space with one A and
reads it back with one B, which blurs the tasks together. MTL-LoRA keeps the shared
down-projection A but (i) lets each task t transform the r-dim code with its own small
matrix Λ_t, and (ii) replaces the single B by n shared up-projections B^1..B^n that each
task averages with its own learnable softmax weights (temperature τ):

    h_t = W x_t + Σ_i [exp(w_t^i / τ) / Σ_j exp(w_t^j / τ)] B^i Λ_t A x_t

(the paper's MTL-LoRA output equation, Sec. 3; we could not check its number, so none is
quoted.) The shared part (A, B^1..B^n) carries knowledge across tasks, Λ_t keeps the
task's information apart in the low-rank space, and w_t chooses how the task mixes the
shared up-projections. The formula is tested against a hand computation.

Initialisation: A Gaussian, every B^i zero and Λ_t the identity, so the untrained model
is the frozen backbone (tested); w_t is drawn from U(-1/sqrt(n), 1/sqrt(n)) as in the
official code (Kaiming-uniform). It must not start uniform: every B^i starts at zero, so
equal mixtures would hand every B^i the same gradient and no gradient to w_t, and the n
up-projections would stay one copy forever (tested). With n = 1 and Λ_t = I the method *is* a single LoRA shared by
all tasks (tested). For each task the update is one matrix, so it merges into W (tested).

Convolutions are treated as in :mod:`.lora`: A is a k x k convolution to r channels, Λ_t
a 1x1 convolution r -> r, each B^i a 1x1 convolution back up.

Left out: the pretrained LLaMA / CLIP backbones (the backbone here is a random frozen
initialisation), dropout, and the choice of which projections in attention to adapt
(here every layer of the small trunk is). τ = 0.5 is our default, not the paper's (the
official scripts use 0.1 for LLaMA and 0.8 for the vision-language runs). A is drawn as in
:mod:`.lora` (Gaussian), where the official code uses Kaiming-uniform; the official code can
also restrict Λ_t to a diagonal (an option its runs leave off). Its runs use r = 8, α = 16 with
3 up-projections (LLaMA) and r = 64, α = 16 with 2 (vision-language, which also train the
backbone's biases and layer norms); α defaults to the rank here (pUmpKin-Co/MTL-LoRA at 7848a70).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .encoders import backbone_layers
from .lora import low_rank_pair
from .task_adapted import TaskAdaptedBackbone


def identity_transform(rank: int, conv: bool) -> nn.Module:
    """Λ_t: an r x r map (1x1 convolution for maps), initialised to the identity."""
    module: nn.Module = nn.Conv2d(rank, rank, 1, bias=False) if conv else nn.Linear(rank, rank, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.eye(rank).view_as(module.weight))
    return module


class MTLLoRAAdapted(nn.Module):
    """A frozen layer W plus, per task t, Σ_i softmax(w_t / τ)_i B^i Λ_t A x."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, tasks: Sequence[str], rank: int,
                 num_up: int, alpha: float, temperature: float):
        super().__init__()
        require_above(0, temperature=temperature)
        self.base = layer
        self.down, first_up = low_rank_pair(layer, rank)  # A shared, B^1 = 0
        self.up = nn.ModuleList([first_up] + [low_rank_pair(layer, rank)[1] for _ in range(num_up - 1)])
        conv = isinstance(layer, nn.Conv2d)
        self.transform = nn.ModuleDict({t: identity_transform(rank, conv) for t in tasks})  # Λ_t
        self.mixing = nn.ParameterDict({t: nn.Parameter(torch.empty(num_up)) for t in tasks})  # w_t
        for w in self.mixing.values():  # random, so the zero-initialised B^i get different gradients
            nn.init.uniform_(w, -num_up**-0.5, num_up**-0.5)
        self.scale = alpha / rank
        self.temperature = temperature

    def mixture(self, task: str) -> Tensor:
        """softmax(w_t / τ): how task t averages the shared up-projections."""
        return torch.softmax(self.mixing[task] / self.temperature, dim=0)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` reads."""
        yield from self.transform[task].parameters()
        yield self.mixing[task]

    def forward(self, x: Tensor, task: str) -> Tensor:
        code = self.transform[task](self.down(x))  # Λ_t A x
        ups = torch.stack([b(code) for b in self.up])  # (n, B, d_out, ...)
        weights = self.mixture(task).view(-1, *([1] * (ups.ndim - 1)))
        return self.base(x) + self.scale * (weights * ups).sum(0)

    def delta_weight(self, task: str) -> Tensor:
        """(α / r) Σ_i softmax(w_t / τ)_i B^i Λ_t A, shaped like W."""
        b = torch.stack([up.weight.flatten(1) for up in self.up])  # n x d_out x r
        mixed = torch.einsum("n,nor->or", self.mixture(task), b)
        lam, a = self.transform[task].weight.flatten(1), self.down.weight.flatten(1)
        return (self.scale * mixed @ lam @ a).view_as(self.base.weight)


class MTLLoRA(TaskAdaptedBackbone):
    """A frozen backbone whose layers carry MTL-LoRA updates (shared A, B^i; per-task Λ_t, w_t)."""

    name = "mtl_lora"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        rank: int = 4,
        num_up: int = 3,
        alpha: float | None = None,
        temperature: float = 0.5,
        freeze_backbone: bool = True,
    ):
        alpha = float(rank) if alpha is None else alpha
        require_positive(num_up=num_up)
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (MTLLoRAAdapted(m, tasks, rank, num_up, alpha, temperature) for m in layers), heads)
