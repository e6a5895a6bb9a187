"""IMTL: impartial multi-task learning, the hybrid of loss balance and gradient balance.

Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (OpenReview IMPnRXEWpvr).
The hybrid combines the two halves:

* IMTL-L (``imtl_l.py``, written alongside the loss-weighting methods): each loss becomes
  e^{s_k} L_k − s_k with a learned s_k, which puts all tasks on the same loss scale;
* IMTL-G (``imtl_g.py``): the shared parameters move along the combination of the scaled
  task gradients whose projections onto every unit task gradient are equal.

Task-specific parameters and the scales s_k receive the ordinary gradient of
Σ_k (e^{s_k} L_k − s_k); the shared parameters receive IMTL-G of the rows ∇_θ(e^{s_k} L_k).
``step`` does all of that; ``__call__`` alone is IMTL-G (use it on rows of scaled losses).
Convention: as IMTL-G, the shared-parameter weights sum to 1.
Checked against LibMTL's re-implementation (``LibMTL/weighting/IMTL.py``), which splits the
gradients the same way (its IMTL-G weights equal ours to 1e-16 on independent gradients). The
paper's Algorithm 1 takes the rows w.r.t. the shared representation z; ``step`` uses the shared
parameters, LibMTL's default: for the paper's version use ``gradients.representation_step``
with ``IMTLG``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod
from reference_impls.weighting.gradients import gradient_step
from reference_impls.weighting.imtl_g import IMTLG
from reference_impls.weighting.imtl_l import IMTLL


class IMTL(GradientMethod):
    """IMTL-L loss scales (``self.loss_scales``, an nn.Module) + IMTL-G for shared params."""

    name = "imtl"
    training_hook = "step"

    def __init__(self, num_tasks: int) -> None:
        self.loss_scales = IMTLL(num_tasks)
        self.gradient_balance = IMTLG()

    def __call__(self, grads: Tensor) -> Aggregation:
        return self.gradient_balance(grads)

    def scaled_losses(self, losses: Tensor) -> Tensor:
        """e^{s_k} L_k − s_k per task (differentiable in both θ and s)."""
        s = self.loss_scales.log_scales.to(dtype=losses.dtype, device=losses.device)
        return s.exp() * losses - s

    def step(self, losses: Tensor, shared_params: Sequence[Tensor], task_params: Sequence[Tensor] = ()) -> Aggregation:
        """Fill ``.grad`` of shared params, task params and the scales s; then optimizer.step().

        The optimizer must also hold ``self.loss_scales.parameters()``.
        """
        params = [*task_params, self.loss_scales.log_scales]
        return gradient_step(self, self.scaled_losses(losses), shared_params, task_params=params)
