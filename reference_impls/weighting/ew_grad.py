"""Equal weighting at the gradient level: the sum of the task gradients.

Baseline for every gradient method. Convention: *sum* of the rows (all weights 1), so the
update equals the gradient of ``sum_k L_k`` that one ordinary backward pass would give.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GramianWeighting


class EqualWeightingGradient(GramianWeighting):
    """update = Σ_k g_k, weights all 1 (the unweighted-sum baseline)."""

    name = "ew_grad"

    def __call__(self, grads: Tensor) -> Aggregation:  # no Gramian needed: skip its O(K²d) cost
        weights = self.weights_from_gramian(grads[:, :0])
        # The weighted form every method uses. On a 2-core CPU, K = 40: 72 ms against sum(0)'s 114 ms
        # at d = 1e7, but 7.0 against 6.1 ms at d = 1e6 (medians of 7, timed ad hoc on 2026-11-24).
        return Aggregation(update=weights @ grads, weights=weights)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return torch.ones(len(gramian), dtype=gramian.dtype, device=gramian.device)
