"""Uncertainty weighting (UW).

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", CVPR 2018, arXiv:1705.07115.

Each task has a homoscedastic noise scale σ_k learned with the network. For regression
tasks with a Gaussian likelihood (Eqs. 2, 5) the paper's joint loss is (Eq. 7, printed for two
outputs, up to constants, and extended to more in the text)

    L = sum_k  L_k / (2 σ_k²)  +  log σ_k.

Form used here: exactly that one, parametrised by the log-variance s_k = log σ_k²
(the paper trains s because it is unconstrained and numerically stable; end of Sec. 3.2,
unnumbered):

    L = sum_k  0.5 * exp(-s_k) * L_k  +  0.5 * s_k.

Why this form and not the common ``exp(-s) L + s``: it is the paper's regression
objective written in s, so the learned weights 1/(2σ²) are the paper's. The other
form is the same objective times 2 (it reaches the same optimum, s_k* = log L_k) but
doubles both the weights and the effective learning rate; the authors' released example
(yaringal/multi-task-learning-example, Keras and PyTorch notebooks on a synthetic
two-output regression) uses that doubled form, exp(-s) times the summed squared error
plus s, per sample and then averaged over the batch (checked at 86e2c88; its s is added once
per output dimension, one in that example, while here it is added once per task loss,
whatever that loss's reduction). Classification tasks in the
paper use 1/σ² instead of 1/(2σ²) (Eq. 10, from the scaled softmax of Eqs. 8-9 and an
approximation the paper states), with the same log σ penalty; with one form for all tasks we
follow most re-implementations and document it here. The paper states no starting value for s;
its Appendix B reports the same optimum from starts of log σ² between −2 and 5 (0 here).

Equation numbers were checked in a Markdown conversion of arXiv:1705.07115v3 in the GitHub file
index (index id 65742597766).

Interface: hand ``uw.parameters()`` (the log-variances) to the optimizer and
back-propagate ``uw.combine(losses)``; ``weights`` returns the current 0.5·exp(-s).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import LossWeighting


class UW(LossWeighting):
    """Learned log-variances s_k; weights 0.5 * exp(-s_k) plus the regulariser 0.5 * s_k."""

    name = "uw"

    def __init__(self, num_tasks: int, init_log_variance: float = 0.0) -> None:
        super().__init__()
        self.log_variances = nn.Parameter(torch.full((num_tasks,), float(init_log_variance)))

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        s = self.log_variances.detach().to(losses)
        return 0.5 * torch.exp(-s)  # 1 / (2 σ²)

    def regulariser(self, s: Tensor) -> Tensor:
        """The penalty on each log-variance: log σ_k = s_k / 2."""
        return 0.5 * s

    def combine(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        s = self.log_variances.to(dtype=losses.dtype)
        # Paper's joint loss in s = log σ²: L_k / (2σ_k²) + log σ_k
        return (0.5 * torch.exp(-s) * losses + self.regulariser(s)).sum()
