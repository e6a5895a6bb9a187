"""PaLoRA: one trainable base network plus one low-rank adapter per task, mixed by a preference.

Dimitriadis, Frossard & Fleuret, "Pareto Low-Rank Adapters: Efficient Multi-Task Learning with
Preferences", ICLR 2025, arXiv:2407.08056.

Pareto front learning: a single model should give, for every trade-off α on the simplex Δ_K,
a network whose K losses sit on (an approximation of) the Pareto front, chosen at inference.
PaLoRA gets there cheaply: every linear / convolution layer keeps its ordinary weight W and
gains K low-rank adapters (A_k, B_k), and the layer used for preference α is (Eq. 2)

    W(α) = W + s Σ_k α_k B_k A_k,          B_k: d_out x r,  A_k: r x d_in,  s = scale.

So α one-hot is "base + that task's adapter" (tested), and W(α) is affine in α (tested).
Training samples α ~ Δ_K each step and minimises the same α-weighted loss Σ_k α_k L_k(W(α)),
so the adapters pick up task-specific directions while W learns what all trade-offs share.
The adapter of task k only receives gradient through α_k (tested: zero for α_k = 0, and
proportional to α_k when the adapters are equal). The task heads are ordinary per-task heads:
head k only ever sees loss k, so it needs no preference.

The model holds the current preference (``set_preference``; uniform by default, so
``model(x)`` works wherever a plain multi-task model is expected) and ``forward`` also
accepts one explicitly. ``sample_preference`` draws α uniformly from the simplex with a
``torch.Generator``; ``weighted_loss`` is Σ_k α_k L_k. The training harness does neither: it
trains at the current (uniform) preference with the chosen method's combination of the
losses, so every adapter gets the same share of every loss and nothing makes them differ;
``training_procedure`` says so, and a Pareto-front run draws α and minimises
``weighted_loss`` at every step itself.

B_k starts at zero (LoRA's initialisation), so the untrained model is the base network for
every α. Adapters reuse ``lora.low_rank_pair``.

Left out: the official deterministic preference schedule (α is drawn uniformly from the
simplex here, the plain Pareto-front-learning recipe; there, ``AnnealingSampler``: an evenly
spaced grid of rays on the simplex, raised element-wise to the power 5 t with t the fraction of
training done and renormalised, so the rays start near uniform and spread out; all rays are
forwarded each step and their weighted losses summed), its loss- and gradient-balanced
variants, its BatchNorm handling, the large backbones, the official code's adapters in the
task heads too (it converts every linear and convolution layer of the model; the heads here
are plain) and its K-times larger learning rate for the adapters. Equation numbers are not
checked against the paper's text: the layer formula is cited as Eq. (2) from the ICLR
reviews, and no copy of the paper was at hand. Its adapter scale is 1 / rank (here ``scale`` = 1, four
times larger at rank 4), its A is uniform rather than Gaussian, and its convolution adapter
factorises as loralib's does (nik-dim/palora at f9e8210).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import backbone_layers, heads_for, trunk_for
from .lora import low_rank_pair
from .registry import Problem


def sample_preference(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """α uniform on the simplex Δ_K (Dirichlet(1, ..., 1)): normalised Exp(1) draws."""
    draws = torch.empty(num_tasks, dtype=torch.float64).exponential_(generator=generator)
    return (draws / draws.sum()).float()


def check_preference(preference: Tensor, num_tasks: int) -> Tensor:
    """Raise unless ``preference`` is a K-vector on the simplex; return it flattened."""
    preference = torch.as_tensor(preference).reshape(-1)
    if len(preference) != num_tasks:
        raise ValueError(f"expected a preference of {num_tasks} entries, got {len(preference)}")
    if bool((preference < 0).any()) or abs(float(preference.sum()) - 1.0) > 1e-5:
        raise ValueError(f"a preference must be non-negative and sum to 1, got {preference.tolist()}")
    return preference


class PreferenceLowRank(nn.Module):
    """A linear or conv layer W plus K rank-r adapters, combined as W + s Σ_k α_k B_k A_k."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, num_tasks: int, rank: int, scale: float):
        super().__init__()
        self.base = layer
        pairs = [low_rank_pair(layer, rank) for _ in range(num_tasks)]
        self.down = nn.ModuleList(a for a, _ in pairs)  # A_k
        self.up = nn.ModuleList(b for _, b in pairs)  # B_k
        self.scale = scale

    def forward(self, x: Tensor, preference: Tensor) -> Tensor:
        out = self.base(x)
        for weight, down, up in zip(preference, self.down, self.up):
            out = out + self.scale * weight * up(down(x))  # Eq. (2), applied to x
        return out

    def delta_weight(self, preference: Tensor) -> Tensor:
        """s Σ_k α_k B_k A_k shaped like W (the adapters' part of W(α))."""
        products = [(b.weight.flatten(1) @ a.weight.flatten(1)) for a, b in zip(self.down, self.up)]
        total = sum(w * p for w, p in zip(preference, products))
        return (self.scale * total).view_as(self.base.weight)


class PaLoRA(MultiTaskModel):
    """A trunk whose layers carry one low-rank adapter per task, mixed by the preference α."""

    name = "palora"
    training_procedure = ("every step takes a preference from a deterministic schedule (sample_preference() "
                          "draws one uniformly instead, the plain Pareto-front-learning recipe) and minimises "
                          "weighted_loss() at it, so that each α gets its own trade-off")

    def __init__(
        self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module],
        rank: int = 4, scale: float = 1.0,
    ):
        super().__init__(tasks)
        layers = backbone_layers(backbone)
        self.layers = nn.ModuleList(PreferenceLowRank(m, len(self.tasks), rank, scale) for m in layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.register_buffer("preference", torch.full((len(self.tasks),), 1.0 / len(self.tasks)))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: object) -> "PaLoRA":
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), heads_for(problem, width), **kw)

    def set_preference(self, preference: Tensor) -> None:
        """Use α = ``preference`` for the following calls without an explicit preference."""
        self.preference.copy_(check_preference(preference, len(self.tasks)))

    def sample_preference(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw α uniformly from the simplex, make it the current preference and return it."""
        self.set_preference(sample_preference(len(self.tasks), generator))
        return self.preference.clone()

    def weighted_loss(self, losses: Mapping[str, Tensor], preference: Tensor | None = None) -> Tensor:
        """Σ_k α_k L_k, the objective trained for preference α."""
        alpha = self.preference if preference is None else preference
        return sum(alpha[i] * losses[t] for i, t in enumerate(self.tasks))

    def encode(self, x: Tensor, preference: Tensor | None = None) -> Tensor:
        alpha = (self.preference if preference is None else check_preference(preference, len(self.tasks))).to(x)
        for layer in self.layers:
            x = torch.relu(layer(x, alpha))
        return x

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x: Tensor, preference: Tensor | None = None) -> dict[str, Tensor]:
        return self.decode(self.encode(x, preference))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Adapter k is "task k's" only at the preference e_k: under any other preference every
        # task's output reads every adapter through W(α), so for gradients they are shared.
        return self.heads[task].parameters()
