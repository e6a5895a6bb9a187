"""Dynamic task prioritization (DTP), task-level part.

Guo, Haque, Huang, Yeung & Fei-Fei, "Dynamic Task Prioritization for Multitask
Learning", ECCV 2018 (no arXiv version; DOI 10.1007/978-3-030-01270-0_17).

Difficulty is read from a key performance indicator (KPI) κ_k ∈ [0, 1] per task
(accuracy, mAP, ... — higher is better), smoothed over time,

    κ̄_k(τ) = α κ_k(τ) + (1 - α) κ̄_k(τ - 1),

and turned into a focal-loss-style weight

    w_k = -(1 - κ̄_k)^γ_k · log κ̄_k,

so a task that is already good (κ̄ → 1) fades out and a poor one (κ̄ → 0) dominates;
γ_k ≥ 0 sets how sharply. The paper also prioritises examples within a task (the usual
focal loss); that part belongs in each task's own loss and is left out here.

Interface: the KPIs are not the losses, so they arrive through ``observe_kpis(kpis)``
(call it whenever you measure them, e.g. per batch on the training batch). Until the
first call the weights are 1 (equal weighting). κ̄ is clamped to [eps, 1] so a KPI of 0
gives a large but finite weight.

Defaults γ = 1 and α = 0.5 are ours (pinned by a test): no copy of the paper's training
settings was at hand and no official code is public. α = 0.5 weighs the newest KPI and the
history equally; γ = 1 makes the focusing factor (1 − κ̄)^γ linear. A third-party
re-implementation (Samsung/Achievement-based-MTL, accuracy_based.py) agrees with the formulas
here but smooths with α = 0.1, recommends γ = 0.5, and takes the KPIs from validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class DTP(LossWeighting):
    """Focal weights -(1 - κ̄)^γ log κ̄ from moving averages of per-task KPIs."""

    name = "dtp"
    training_hook = "observe_kpis"

    def __init__(
        self, gamma: float | Sequence[float] = 1.0, smoothing: float = 0.5, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.smoothing = smoothing  # α: weight of the newest KPI
        self.eps = eps
        self.register_buffer("smoothed_kpis", torch.empty(0))

    def observe_kpis(self, kpis: Tensor) -> None:
        """Fold a new KPI measurement (K values in [0, 1]) into the moving average."""
        kpis = kpis.detach().clamp(0.0, 1.0)
        if self.smoothed_kpis.numel() == 0:
            self.smoothed_kpis = kpis.clone()
        else:
            previous = self.smoothed_kpis.to(kpis)
            self.smoothed_kpis = self.smoothing * kpis + (1 - self.smoothing) * previous

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        if self.smoothed_kpis.numel() == 0:
            return torch.ones_like(losses).detach()
        kappa = self.smoothed_kpis.to(losses).clamp(self.eps, 1.0)
        gamma = torch.as_tensor(self.gamma, dtype=losses.dtype, device=losses.device)
        return -((1 - kappa) ** gamma) * torch.log(kappa)  # focal weight per task
