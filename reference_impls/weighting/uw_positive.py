"""Uncertainty weighting with a positive regulariser, ln(1 + σ²).

Liebel & Körner, "Auxiliary Tasks in Multi-task Learning", arXiv:1805.06334, 2018.

The paper trains a driving-scene network with extra, cheap auxiliary tasks and weights
all losses with a modification of Kendall et al.'s uncertainty weighting (``uw.py``). UW's
joint loss Σ_k L_k / (2σ_k²) + log σ_k has a regulariser log σ_k that is negative for
σ_k < 1, so the total objective can go below zero and, for a task whose loss reaches 0,
falls without bound as σ_k → 0. Liebel & Körner replace it with ln(1 + σ_k²):

    L = Σ_k  L_k / (2 σ_k²)  +  ln(1 + σ_k²),

whose regulariser is positive for every σ_k ≠ 0, so the objective stays ≥ 0 when the
losses are. It also changes where σ_k settles. Setting the derivative in v = σ² to zero,
-L/(2v²) + 1/(1+v) = 0, gives

    σ_k*² = (L_k + sqrt(L_k² + 8 L_k)) / 4,   weight 1 / (2 σ_k*²),

against UW's σ_k*² = L_k, weight 1/(2 L_k). For large losses σ*² ≈ L/2 + 1, a weight of
about 1/(L + 2), near twice UW's; for small losses the weight grows only like
1/sqrt(2 L), not like 1/(2 L), so a nearly solved task is not blown up as much.

Parametrisation: the paper learns σ_k itself. We learn the log-variance s_k = log σ_k², as
``uw.py`` does, and subclass UW, so that the two differ only in the regulariser (here ln(1 + e^s) =
softplus(s), computed stably); the objective as a function of σ² is the paper's, the path
gradient descent takes to its minimum is not. Equation numbers are not cited: no copy of
the paper's text was at hand to check them. Hand ``parameters()`` to the optimizer and
back-propagate ``combine(losses)``; ``weights`` returns the current 0.5·exp(-s).

Left out: the auxiliary tasks and the network of the paper (only the weighting is here),
and learning σ_k directly (see above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.weighting.uw import UW


class UWPositive(UW):
    """UW with the regulariser ln(1 + σ_k²) = softplus(s_k) in place of log σ_k."""

    name = "uw_positive"

    def regulariser(self, s: Tensor) -> Tensor:
        return F.softplus(s)  # ln(1 + e^s), stable for large s


def optimal_variance(losses: Tensor) -> Tensor:
    """σ*² minimising L / (2σ²) + ln(1 + σ²) for each loss: the root of 2v² - Lv - L = 0."""
    return (losses + torch.sqrt(losses**2 + 8 * losses)) / 4
