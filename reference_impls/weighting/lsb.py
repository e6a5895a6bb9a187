"""LSB: loss scale balancing.

Lee, Lee & Kim, "Learning Multiple Pixelwise Tasks Based on Loss Scale Balancing",
ICCV 2021 (DOI 10.1109/ICCV48922.2021.00506; no arXiv version).

What the paper states (abstract): instead of steering each loss's trend, LSB
periodically balances the *loss scales* — the products w_k · L_k — and, judging each
task's difficulty from its loss record, shifts weight towards difficult tasks.

Caveat: the paper's full equations could not be consulted while writing this file
(the authors' repository holds no code). What follows implements the two mechanisms the
abstract names, in the simplest form we could justify; treat the difficulty term as our
reading, not the paper's exact rule.

Per period (an epoch), with L̄_k(t) the task's mean loss over period t:

    balance:    b_k = (sum_j L̄_j(t-1)) / (K · L̄_k(t-1))      so every b_k L̄_k(t-1) is equal
                                                              and sum_k b_k L̄_k = sum_k L̄_k
    difficulty: d_k = (L̄_k(t-1) / L̄_k(t-2))^β,  normalised to sum to K
                (a loss that fell little, ratio near 1 or above, is "difficult")
    weight:     w_k(t) = d_k · b_k

With only one past period d_k = 1; with none, w_k = 1. β defaults to 1, our choice (no
value from the paper could be checked); β = 0 gives pure loss-scale balancing. The closest
code to the authors' (the "Loss Scale Balancing" block of PJaemin/HTF-Net, from a co-author's
lab; the official jaehanlee-mcl/LSB-MTL holds only a README) gives the same relative weights
at every epoch, but scales them by the previous epoch's mean *weighted* total loss instead of
the raw sum, and does not normalise the difficulty to sum to K: the same direction, another
overall size (a different learning-rate schedule under SGD). Because
b_k grows like 1 / L̄_k, a task whose loss nears zero gets a very large weight; pair LSB
with an adaptive optimizer (Adam) or a small learning rate.

Interface: as DWA — call ``weights(losses, epoch=e)`` every step; the call records the
losses and the weights are fixed within an epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import EpochLossMeans, LossWeighting


class LSB(LossWeighting):
    """Equalise w_k · L̄_k each period, tilted towards tasks whose loss fell least."""

    name = "lsb"

    def __init__(self, difficulty_power: float = 1.0) -> None:
        super().__init__()
        self.difficulty_power = difficulty_power  # β
        self.history = EpochLossMeans()

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        losses = losses.detach()
        self.history.record(losses, epoch)
        last, before_last = self.history.mean(epoch - 1), self.history.mean(epoch - 2)
        if last is None:
            return torch.ones_like(losses)
        num_tasks = losses.numel()
        balance = last.sum() / (num_tasks * last)  # b_k: equal loss scales
        if before_last is None:
            return balance
        difficulty = (last / before_last) ** self.difficulty_power
        difficulty = num_tasks * difficulty / difficulty.sum()  # d_k, sums to K
        return difficulty * balance
