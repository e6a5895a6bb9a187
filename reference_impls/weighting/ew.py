"""Equal weighting (EW): the baseline every other method is measured against.

Not a paper of its own; it is the "uniform scaling" / "linear scalarisation" baseline
used throughout the MTL literature (e.g. as "EW" in Baijiong Lin et al., "Reasonable
Effectiveness of Random Weighting", TMLR 2022, arXiv:2111.10603). Kurin, De Palma,
Kostrikov, Whiteson & Kumar, "In Defense of the Unitary Scalarization for Deep Multi-Task
Learning", NeurIPS 2022 (arXiv:2201.04122), call this sum the "unitary scalarization"
and argue that, tuned and regularised like any single-task model (weight decay, dropout,
early stopping), it is a hard baseline for the specialised optimizers: the catalogue
links that paper here, since the method is this class plus ordinary regularisation.

Convention: every weight is 1, so the objective is the *sum* of the task losses,
``sum_k L_k``. This matches ``GradientMethod``'s convention that equal weighting means
the sum of the task gradients, and ``(sum_k L_k).backward()``. For the *mean* instead, divide
the losses by K (the direction is the same); dividing the learning rate by K is the same only
for plain SGD (Adam's steps are nearly scale-free, and weight decay would shrink too).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class EW(LossWeighting):
    """w_k = 1 for every task."""

    name = "ew"

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return torch.ones_like(losses).detach()
