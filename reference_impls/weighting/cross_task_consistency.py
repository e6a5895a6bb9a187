"""Cross-task consistency (X-TC): a prediction must agree with other tasks through a frozen map.

Zamir, Sax, Yeo, Kar, Cheerla, Suri, Cao, Malik, Guibas, "Robust Learning Through
Cross-Task Consistency", CVPR 2020 (arXiv:2006.04096). Predictions of different tasks
for one image describe one scene, so they constrain each other. For a network
f_{X->Y1} (e.g. image -> surface normals) and a cross-task network f_{Y1->Y2} (normals ->
depth), trained beforehand and then frozen, the paper's triangle loss asks that going
X -> Y1 -> Y2 lands where Y2 should be. Its practical form (Sec. 3, the "perceptual"
loss) has two separate terms for the network being trained:

    direct      = |f_{X->Y1}(x) - y1|
    perceptual  = |f_{Y1->Y2}(f_{X->Y1}(x)) - f_{Y1->Y2}(y1)|

The perceptual target is f_{Y1->Y2}(y1), not the label y2, so that errors of the
imperfect cross-task network cancel on both sides. ``separable`` gives the version with
y2 in its place, |f_{Y1->Y2}(f_{X->Y1}(x)) - y2| (the paper's step before the perceptual
one). Gradients reach the prediction through the frozen network, never the frozen
network's parameters (tested). Norms are the mean absolute error, as in the paper (L1).

This is a loss, not a task weighting: :class:`CrossTaskConsistency` returns the terms;
the caller adds ``direct + perceptual_weight * perceptual`` to its objective.

Left out: the paper's large graph of tasks and path sampling (only one triangle
X -> Y1 -> Y2 here, several can be summed), training the cross-task networks (they are
given), the loss normalisation over paths (the "GradNorm-like" balancing), the released
training's choice of which k perceptual paths to use each epoch by their win rate against
the direct X -> Y2 networks (``energy.py``, ``WinRateEnergyLoss``), the masking of invalid
pixels in the L1 norms, and the consistency energy.

Checked against EPFL-VILAB/XTConsistency at 6d05161 (energy.py, task_configs.py, graph.py):
the perceptual target f(y1), the L1 mean error and the frozen networks match. Our ``direct``
is its ``mae`` term; its own ``direct_*`` losses are something else (the direct X -> Y2
network scored without gradient, for the win rate only). Its runs weight every term by the
gradient-ratio normalisation above at every step, never ``direct + 1 * perceptual``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ConsistencyTerms:
    """The direct and perceptual terms and their weighted sum."""

    direct: Tensor
    perceptual: Tensor
    total: Tensor


class CrossTaskConsistency(nn.Module):
    """Consistency loss of predictions of Y1 through a frozen network f_{Y1->Y2}."""

    def __init__(self, cross_task: nn.Module, perceptual_weight: float = 1.0):
        super().__init__()
        self.cross_task = cross_task.eval()
        for p in self.cross_task.parameters():
            p.requires_grad_(False)  # frozen: trained beforehand, never updated here
        self.perceptual_weight = perceptual_weight

    def train(self, mode: bool = True) -> "CrossTaskConsistency":
        super().train(mode)
        self.cross_task.eval()  # stays in eval mode (e.g. batch-norm statistics)
        return self

    def forward(self, prediction: Tensor, y1: Tensor) -> ConsistencyTerms:
        """Terms for ``prediction`` = f_{X->Y1}(x) and its label ``y1``."""
        direct = (prediction - y1).abs().mean()
        with torch.no_grad():
            target = self.cross_task(y1)  # f_{Y1->Y2}(y1): a fixed target
        perceptual = (self.cross_task(prediction) - target).abs().mean()
        return ConsistencyTerms(direct, perceptual, direct + self.perceptual_weight * perceptual)

    def separable(self, prediction: Tensor, y2: Tensor) -> Tensor:
        """|f_{Y1->Y2}(f_{X->Y1}(x)) - y2|: consistency measured against the label y2."""
        return (self.cross_task(prediction) - y2).abs().mean()
