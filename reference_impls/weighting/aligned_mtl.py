"""Aligned-MTL: make the task gradients an orthogonal system with equal norms.

Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
arXiv:2305.19000, Algorithm 1. A gradient system is unstable when its Gramian is badly
conditioned (dominating or conflicting gradients; the condition number κ = σ_max / σ_min,
Eq. 2). Aligned-MTL replaces the rows G by Ĝ = B G whose Gramian has condition number 1 on the
span of the rows (Eq. 3; the nearest such system, Eq. 4, solved in task space, Eq. 5):

    M = G Gᵀ = V Λ Vᵀ                    (eigen-decomposition, rank R)
    B = √λ_R · V_R Λ_R^{-1/2} V_Rᵀ        (λ_R: the smallest non-zero eigenvalue)
    update = Ĝᵀ w = Gᵀ (B w)

so Ĝ Ĝᵀ = B M B = λ_R V_R V_Rᵀ: every non-zero singular value of Ĝ equals √λ_R, the
smallest one of G (the paper's choice of scale, stated after Eq. 4; the smallest non-zero one
for a singular G, Remark in Sec. 5.1). The paper stacks the gradients as columns, so its
M = GᵀG and Eq. 5 reads Ĝ = σ G V Σ^{-1} Vᵀ; Algorithm 1 returns G α with α = B w. The task
weights w are the paper's pre-defined importance vector. Eigenvalues below K·eps·λ_max count
as zero, with eps that of the Gramian's dtype: a float32 Gramian is only that accurate even
though we decompose it in float64 (the authors' code uses ``torch.finfo().eps``, float32's,
whatever the input dtype, so on an ill-conditioned float64 input its rank, and update, can
differ from ours). All-zero rows give B = I (the update is zero anyway).

Convention: w defaults to all ones (*sum*, as in the authors' code); TorchJD uses 1/K, which is
also the paper's printed choice (w_i = 1/T in Sec. 3.1, the average loss of Eq. 1), so our
default update is K times the paper's.

Left out: the authors' code's other scale choices for B (median or mean eigenvalue instead
of the smallest) and its optional rescaling of the task-specific decoders' gradients by B w.
Aligned-MTL-UB (Sec. 5.2, Eqs. 6-7), the same rule on gradients with respect to the shared
representation, is a matter of which gradients the caller passes in.

Equation numbers were checked in a Markdown conversion of arXiv:2305.19000v1 in the GitHub file
index (index id 66014776344).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import normalized_gramian


def balance_matrix(gramian: Tensor) -> Tensor:
    """B = √λ_R V_R Λ_R^{-1/2} V_Rᵀ; it does not depend on the scale of the Gramian."""
    matrix, scale = normalized_gramian(gramian)
    k = len(matrix)
    if scale == 0.0:
        return torch.eye(k, dtype=matrix.dtype, device=matrix.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Rounding in the input's dtype, not the solver's, sets which eigenvalues are noise.
    keep = eigenvalues > k * torch.finfo(gramian.dtype).eps * eigenvalues.max()
    values, vectors = eigenvalues[keep], eigenvectors[:, keep]
    return values.min().sqrt() * (vectors * values.rsqrt()) @ vectors.T


class AlignedMTL(GramianWeighting):
    """Condition-number alignment of the task gradients; weights B w."""

    name = "aligned_mtl"

    def __init__(self, task_weights: Tensor | None = None) -> None:
        self.task_weights = task_weights

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        balance = balance_matrix(gramian)
        w = torch.ones(len(gramian)) if self.task_weights is None else self.task_weights
        return (balance @ w.to(balance)).to(gramian.dtype)
