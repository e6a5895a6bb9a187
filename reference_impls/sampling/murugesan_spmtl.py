"""Self-paced task weights: easy tasks first, with the pace λ admitting harder ones over time.

Murugesan & Carbonell, "Self-Paced Multitask Learning with Shared Knowledge", IJCAI 2017,
arXiv:1703.00977.

Classic self-paced learning weights *examples*; here the unit is the *task*. Each task t
has a score ℓ_t: its training loss plus its share of the multi-task regulariser that ties
it to the shared knowledge Θ (e.g. w_tᵀ D⁻¹ w_t in multitask feature learning). A task
with a low score is "easy" given what the other tasks already share. The objective is
bi-convex in the task parameters and the task weights τ:

    min_{W, Θ, τ}  Σ_t τ_t [ L_t(w_t) + P(w_t, Θ) ]  +  λ r(τ),

and training alternates three steps: fit W given (τ, Θ); set τ in closed form given W;
update Θ from the τ-weighted tasks; then grow the pace λ ← c λ.

τ step used here (the default of the authors' released code): with τ on the simplex and
the entropy regulariser r(τ) = Σ_t τ_t log τ_t, the minimiser is

    τ_t = exp(−ℓ_t / λ) / Σ_s exp(−ℓ_s / λ),

so a small λ puts almost all weight on the easiest task and λ → ∞ gives equal weights.
The ``hard`` mode is the binary self-paced rule τ_t = 1[ℓ_t < λ] (minimiser of
Σ τ_t ℓ_t − λ Σ τ_t over τ ∈ [0, 1]^T), renormalised: the classic self-paced rule, ours here;
the authors' code has it only in commented-out lines (SPMTLearner.m), and its other modes are a
``sparse`` one (the λ easiest tasks weigh 1, the rest 0.01, λ growing additively) and the
entropy rule above. There the task weights enter only the shared-knowledge update, not the
fit of the task weights W; ``combine`` weighting the whole loss is our adaptation to shared
networks.

Sources: the update rules follow the authors' MATLAB code (keerthi166/FMTL,
``model/SPMTFLearner.m``: ``tau = exp(-taskF/lambda)``, normalised, ``lambda *= 1.1``);
the PDF's equation numbers could not be consulted here, so equations are named, not numbered.

Left out: the per-formulation solvers for W and Θ (MTFL, MMTL, MTASO, ...); this module
only turns task scores into weights and grows the pace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.checks import require_above, require_at_least


def entropy_task_weights(scores: Tensor, pace: float) -> Tensor:
    """argmin over the simplex of Σ τ_t ℓ_t + λ Σ τ_t log τ_t, i.e. softmax(−ℓ / λ)."""
    require_above(0, pace=pace)
    return torch.softmax(-scores / pace, dim=0)


def hard_task_weights(scores: Tensor, pace: float) -> Tensor:
    """Binary self-paced selection 1[ℓ_t < λ], renormalised; the easiest task if none passes."""
    selected = (scores < pace).to(scores.dtype)
    if selected.sum() == 0:  # keep training on something: the easiest task
        selected = torch.zeros_like(scores)
        selected[torch.argmin(scores)] = 1.0
    return selected / selected.sum()


class SelfPacedTaskWeights:
    """Task weights from task scores, with a pace λ that grows by ``growth`` per round."""

    name = "spmtl_shared_knowledge"

    def __init__(self, pace: float = 1.0, growth: float = 1.1, mode: str = "entropy") -> None:
        require_above(0, pace=pace)
        require_at_least(1, growth=growth)
        if mode not in ("entropy", "hard"):
            raise ValueError("mode must be 'entropy' or 'hard'")
        self.pace, self.growth, self.mode = pace, growth, mode

    def weights(self, scores: Tensor) -> Tensor:
        """τ for the current pace; scores are the K per-task losses (+ regulariser), detached."""
        scores = scores.detach()
        if not torch.isfinite(scores).all():
            raise ValueError(f"task scores must be finite, got {scores.tolist()}")
        if self.mode == "entropy":
            return entropy_task_weights(scores, self.pace)
        return hard_task_weights(scores, self.pace)

    def step(self) -> None:
        """End of a round (after the shared-knowledge update): λ ← c λ."""
        self.pace *= self.growth

    def combine(self, task_losses: Tensor) -> Tensor:
        """The τ-weighted objective Σ_t τ_t ℓ_t for the W step (τ held fixed)."""
        return (self.weights(task_losses) * task_losses).sum()
