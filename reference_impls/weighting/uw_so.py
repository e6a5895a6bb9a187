"""Soft optimal uncertainty weighting (UW-SO).

Kirchdorfer, Elich, Kutsche, Stuckenschmidt, Schott & Köhler, "Analytical
Uncertainty-Based Loss Weighting in Multi-Task Learning", arXiv:2408.07985, 2024 (the
authors' code cites it as GCPR 2024).

Uncertainty weighting (``uw.py``) learns one noise scale σ_k per task by gradient descent,
and the paper's point is that this is slow: σ_k lags behind the losses it should track.
The UW objective can instead be minimised over σ_k in closed form for the current loss,
which puts σ_k² at L_k for the Gaussian form of ``uw.py`` (σ_k at L_k for an L1 loss), so each
task's weight becomes inversely
proportional to its loss. Using that optimum directly, with the loss held fixed, is UW-O:

    w_k = 1 / L_k                                                 (UW-O)

UW-O makes every weighted loss w_k L_k equal to 1, and nothing bounds a weight as its
loss goes to 0. UW-SO tempers the same inverse losses with a softmax of temperature T,
so the weights are normalised (they sum to 1) and T sets how strongly the smallest loss
dominates:

    w_k = exp(1 / (T L_k)) / Σ_j exp(1 / (T L_j))                 (UW-SO)

T → ∞ gives equal weights 1/K; T → 0 puts all weight on the task with the smallest loss.
The weights are computed from the detached losses each step and carry no gradient (the
network is trained on Σ_k w_k L_k). ``eps`` is added to every loss before inverting, as
in the authors' code, so a zero loss gives a large finite logit instead of a division by 0.
``soft=False`` returns the UW-O weights. Equation numbers are not cited: no copy of the
paper's text was at hand to check them; the rule above follows the authors' code.

Left out: the paper's per-loss-type derivations of the optimum (L1, L2, cross-entropy:
they differ only in a constant factor that the softmax or the learning rate absorbs) and
the temperature search; T is a constructor argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class UWSO(LossWeighting):
    """Softmax over inverse losses with temperature T (weights sum to 1); UW-O if not soft."""

    name = "uw_so"

    def __init__(self, temperature: float = 1.0, soft: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.soft = soft
        self.eps = eps

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        inverse = 1.0 / (losses.detach() + self.eps)  # UW-O: the analytic optimum of UW
        if not self.soft:
            return inverse
        return torch.softmax(inverse / self.temperature, dim=0)  # UW-SO
