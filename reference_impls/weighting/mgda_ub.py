"""MGDA-UB: MGDA applied to the gradients w.r.t. a shared representation.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv:1810.04650. For an encoder z = f(x; θ_sh) (the paper's Eq. 5) the chain rule gives
∂L_k/∂θ_sh = (∂z/∂θ_sh)ᵀ ∂L_k/∂z, so ||Σ α_k ∇_θ L_k|| <= ||∂z/∂θ_sh|| · ||Σ α_k ∇_z L_k||
(Eq. 6, squared there). MGDA-UB minimises this upper bound (the problem the paper labels
"(MGDA-UB)" rather than numbering): it runs the min-norm problem on the K rows ∇_z L_k
(one backward pass to z per task, none through the encoder), then back-propagates
Σ_k α_k L_k once through the encoder. Same exact solver and simplex convention as ``MGDA``.
The rows are the whole batch x features gradients ∇_Z L_k, Z = (z_1, ..., z_N) as in the
paper; LibMTL's representation mode sums them over the batch before the Gramian, which in
general gives other weights.

Usage (``representation_step`` in gradients.py does the plumbing)::

    z = encoder(x)
    losses = torch.stack([loss_k(head_k(z)) for ...])
    MGDAUB().backward(losses, z, task_params=heads.parameters())
    optimizer.step()

Left out: as for ``MGDA``, the authors' optional gradient normalisation before the solver; the
heads get the gradients of Σ_k L_k (the paper's update of the task-specific parameters), not of
Σ_k α_k L_k as in the authors' code.

Equation numbers were checked in a PDF-to-text transcript of arXiv:1810.04650v2 (11 January
2019) in the GitHub file index (index id 52686274209).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from reference_impls.weighting.base import Aggregation
from reference_impls.weighting.gradients import representation_step
from reference_impls.weighting.mgda import MGDA


class MGDAUB(MGDA):
    """MGDA whose rows are representation gradients; ``backward`` runs the whole step."""

    name = "mgda_ub"
    training_hook = "backward"  # on the shared representation, not the parameter gradients

    def backward(self, losses: Tensor, representation: Tensor, task_params: Sequence[Tensor] = ()) -> Aggregation:
        """Weights from ∇_z L_k, then one backward of Σ_k α_k L_k through the encoder."""
        return representation_step(self, losses, representation, task_params=list(task_params))
