"""LORPMAN: a shared main network plus task low-rank matrices mixed by a preference, kept orthogonal.

Chen & Kwok, "Efficient Pareto Manifold Learning with Low-Rank Structure", ICML 2024,
PMLR 235:7015-7032, arXiv:2407.20734.

PaMaL-style Pareto manifold learning stores K full networks, one per task, which does not
scale to many tasks. LORPMAN keeps one main network θ_0 and, in every layer, K low-rank
matrices; the layer for preference α ∈ Δ_K is

    W(α) = W_0 + s Σ_k α_k B_k A_k,        B_k: d_out x r,  A_k: r x d_in,

trained like PaMaL on Σ_k α_k L_k(W(α)) with α sampled from the simplex each step. The
main network carries the features all tasks share, the low-rank terms what makes the
trade-offs differ. The layer is the same as PaLoRA's (``palora.PreferenceLowRank``, reused).
Every task's output goes through W(α), which reads all K low-rank terms, so every task's loss
reaches every B_k A_k: in this package's split they are shared parameters, and only the task
heads are task-specific (tested).

What LORPMAN adds is an orthogonal regulariser on the task low-rank matrices, so that the K
directions do not duplicate or fight each other. Here it is, per layer,

    R = Σ_{i<j} ||A_i A_jᵀ||_F²,

zero exactly when the row spaces of the A_k are mutually orthogonal, which makes the task
updates B_k A_k orthogonal too (a sufficient condition only: at the start every B_k is zero,
so the updates are trivially orthogonal while R is positive; tested), added to the loss with weight ``orthogonal_weight`` (``regularised_loss``).
:meth:`LORPMAN.auxiliary_loss` is that weighted penalty (it reads the weights, not the last
forward pass), so the training harness adds it every step; the default weight, 1e-2, is our
choice. The harness does not draw a preference per step (``training_procedure`` says so, as
for PaLoRA): it trains at the current one, uniform unless set.

Left out: the paper's two training phases (the second one changes which parts are
trained), its scaling factor schedule, the large backbones, and equation numbers: no copy
of the paper's text was at hand, so the exact form of its orthogonality penalty (which
factor it acts on, squared or not) was not checked; the penalty above is our reading of
"low-rank matrices orthogonal to each other". Until that form is checked, the catalogue
entry does not link here: the layer is LORPMAN's, the regulariser may not be.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative
from .palora import PaLoRA
from .registry import Problem


def orthogonality_penalty(downs: Sequence[nn.Module]) -> Tensor:
    """Σ_{i<j} ||A_i A_jᵀ||_F² over the K down-projections A_k of one layer."""
    flat = [a.weight.flatten(1) for a in downs]  # r x d_in each (C_in k k for a kernel)
    terms = [(flat[i] @ flat[j].T).square().sum() for i in range(len(flat)) for j in range(i + 1, len(flat))]
    return torch.stack(terms).sum() if terms else flat[0].new_zeros(())


class LORPMAN(PaLoRA):
    """Main network W_0 + s Σ_k α_k B_k A_k per layer, with an orthogonality penalty on the A_k."""

    name = "lorpman"
    training_procedure = ("every step draws a preference with sample_preference() and minimises "
                          "regularised_loss() at it")

    def __init__(
        self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module],
        rank: int = 4, scale: float = 1.0, orthogonal_weight: float = 1e-2,
    ):
        require_non_negative(orthogonal_weight=orthogonal_weight)
        super().__init__(tasks, backbone, heads, rank=rank, scale=scale)
        self.orthogonal_weight = orthogonal_weight

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: object) -> "LORPMAN":
        return super().from_problem(problem, width, depth, **kw)  # type: ignore[return-value]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # W(α) mixes every task's low-rank term into the layer all tasks read: only the head is own.
        return self.heads[task].parameters()

    def orthogonal_regularizer(self) -> Tensor:
        """R summed over the adapted layers."""
        return torch.stack([orthogonality_penalty(layer.down) for layer in self.layers]).sum()

    def auxiliary_loss(self) -> Tensor:
        """orthogonal_weight · R, which the training harness adds to the task objective."""
        return self.orthogonal_weight * self.orthogonal_regularizer()

    def regularised_loss(self, losses: Mapping[str, Tensor], preference: Tensor | None = None) -> Tensor:
        """Σ_k α_k L_k + orthogonal_weight · R: the training objective for preference α."""
        return self.weighted_loss(losses, preference) + self.auxiliary_loss()
