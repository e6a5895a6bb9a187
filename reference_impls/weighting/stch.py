"""Smooth Tchebycheff scalarisation (STCH).

Xi Lin et al., "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML 2024, arXiv:2402.19078.

The Tchebycheff scalarisation minimises the worst weighted gap to a reference (ideal)
point z*, max_k λ_k (L_k - z_k*), which can reach every Pareto-optimal point but is not
smooth. STCH replaces the max by its log-sum-exp smoothing with parameter μ > 0:

    g_μ(L | λ) = μ · log sum_k exp( λ_k (L_k - z_k*) / μ ).

max ≤ g_μ ≤ max + μ log K, so g_μ → max as μ → 0. Its gradient weights the tasks by

    w_k = ∂g_μ/∂L_k = λ_k · softmax_k( λ (L - z*) / μ ),

which concentrates on the worst task as μ shrinks. Convention: λ defaults to all ones
(so the weights sum to 1) and z* to 0 (losses are non-negative). The paper's MTL runs
additionally apply STCH to log losses normalised by a nadir point measured in warm-up
epochs; pass transformed losses to get that variant.

Left out (from the authors' code, github.com/Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/
STCH.py``): the warm-up itself, during which the network trains on the plain sum of the log
losses while the nadir point (the mean raw loss over the last warm-up epoch) is measured
(five epochs there), and the factor K by which the official smoothed loss is multiplied (a
constant scale of the step: a K-times larger learning rate for plain SGD, nearly nothing
under the Adam their runs use).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class STCH(LossWeighting):
    """μ-smoothed Tchebycheff: μ log sum exp(λ (L - z*) / μ)."""

    name = "stch"

    def __init__(
        self, mu: float = 1.0, preference: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__()
        if mu <= 0:
            raise ValueError("mu must be positive")
        self.mu = mu
        self.preference = preference  # λ
        self.reference = reference  # z*

    def _scaled_gaps(self, losses: Tensor) -> Tensor:
        preference = torch.ones_like(losses) if self.preference is None else self.preference
        reference = torch.zeros_like(losses) if self.reference is None else self.reference
        return preference.to(losses) * (losses - reference.to(losses))  # λ_k (L_k - z_k*)

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        losses = losses.detach()
        preference = torch.ones_like(losses) if self.preference is None else self.preference
        return preference.to(losses) * torch.softmax(self._scaled_gaps(losses) / self.mu, dim=0)

    def combine(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return self.mu * torch.logsumexp(self._scaled_gaps(losses) / self.mu, dim=0)

    def gap_bound(self, num_tasks: int) -> float:
        """Upper bound μ log K on g_μ - max_k λ_k (L_k - z_k*)."""
        return self.mu * math.log(num_tasks)
