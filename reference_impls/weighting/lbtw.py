"""Loss-balanced task weighting (LBTW).

Liu, Liang & Gitter, "Loss-Balanced Task Weighting to Reduce Negative Transfer in
Multi-Task Learning", AAAI 2019 (student abstract, pp. 9977-9978; no arXiv version;
DOI 10.1609/aaai.v33i01.33019977).

Negative transfer: in a multi-task model some tasks end up worse than their single-task
models. LBTW's remedy is to let a task that has already reduced its loss a lot step back,
so it stops dominating the shared layers, and to keep weight on the tasks whose loss has
hardly moved. Each task's weight is its current loss relative to a reference loss,
raised to a power α:

    w_k = (L_k / L_k(0)) ** α,

recomputed every step from the detached losses. α = 0 is equal weighting; the larger α,
the more a task that has improved is down-weighted. The reference L_k(0) is the loss of
the first batch of the current epoch, so the ratio measures progress within an epoch.
As in the authors' code (``src/pcba_run.py``, which resets the reference at batch 0 of
every epoch and reads α = 0.5 from ``json/LBTW.json``; the audit's side-by-side run agreed
exactly), the weights are then rescaled to sum to K. The paper is a
two-page abstract; its equation numbering was not checked (no copy of the text was at
hand), and the reference-per-epoch and sum-to-K details follow the authors' code.

Interface: call ``weights(losses, epoch=e)`` (or ``combine``) every step; the first call
with a new ``e`` stores that batch's losses as the reference, so its weights are all 1.
A task whose reference loss is 0 has no defined ratio and keeps ratio 1; a negative ratio (a
loss below 0) counts as 0, so its weight is 0 rather than NaN; if every current loss is 0 the
weights are all 1.

Left out: nothing of the weighting rule; the paper's 128-task PubChem experiments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class LBTW(LossWeighting):
    """Weights (L_k / L_k at the epoch's first batch) ** α, rescaled to sum to K."""

    name = "lbtw"

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("initial_losses", torch.empty(0))
        self.reference_epoch: int | None = None

    def get_extra_state(self) -> dict:  # the epoch the reference losses belong to, for checkpoints
        return {"reference_epoch": self.reference_epoch}

    def set_extra_state(self, state: dict) -> None:
        self.reference_epoch = state["reference_epoch"]

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        losses = losses.detach()
        if epoch != self.reference_epoch:  # first batch of an epoch: new reference L(0)
            self.initial_losses = losses.clone()
            self.reference_epoch = epoch
        initial = self.initial_losses.to(losses)
        ratio = torch.where(initial > 0, losses / initial.where(initial > 0, 1.0), 1.0)
        weights = ratio.clamp(min=0) ** self.alpha  # (L / L(0))^α
        if not weights.sum() > 0:  # every task at loss 0: nothing to balance
            return torch.ones_like(losses)
        return losses.numel() * weights / weights.sum()  # rescaled to sum to K
