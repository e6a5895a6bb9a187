"""SVD-based task reweighting for tasks that share their inputs (Wu, Zhang & Ré, Algorithm 2).

Wu, Zhang & Ré, "Understanding and Improving Information Transfer in Multi-Task Learning",
ICLR 2020, arXiv:2005.00944. Section 2.4, Proposition 3 and Algorithm 2 of that paper.
Equation numbers are those of the anonymous ICLR 2020 submission (OpenReview) text, a Markdown
transcript in the public GitHub index (file id 62249186355), not of arXiv:2005.00944 or the
camera-ready, which were not at hand; in it Eq. 2, Eq. 5, Section 2.4, Proposition 3 and
Algorithm 2 (rank r in 1..k, α_i = ||θ_iᵀ U_r||) are as cited here.

The paper studies a shared module B with one output layer per task. When all K tasks read
the same inputs X (m x d) with their own labels y_i (a multi-label data set), Proposition 3
shows that the optimal shared module of capacity r is fixed by the best rank-r approximation
of Σ_i α_i Uᵀ y_i y_iᵀ U (X = U D Vᵀ): the task weights α_i of the loss Σ_i α_i L_i (their
Eq. 2) decide which label directions the shared module keeps. A task whose labels are mostly
noise points away from the directions the other tasks share, so it should count less.

Algorithm 2 turns this into fixed weights computed once, before training:

    θ_i = Xᵀ y_i                     (one column per task; d x K)
    U_r = top-r left singular vectors of [θ_1, ..., θ_K]
    α_i = ||U_rᵀ θ_i||               (the part of θ_i inside the principal r directions)

so α_i <= ||θ_i||, with equality for every task when r = K (or r >= the rank of the θ's). The
weights are not normalised (the paper does not say to); ``normalize=True`` rescales them to sum
to K. They are invariant to any rotation of the input features (X -> XQ, Q orthogonal).
The scheme relies on the shared signal dominating the top directions: a noise task whose
labels are much larger than the others' can take the top singular direction itself and
then keeps its weight (we saw this once with noise three times the signal's scale; whether it
happens depends on the numbers of examples and features, and an audit could not reproduce it
at other sizes).

Interface: a ``LossWeighting`` built from (X, Y); ``weights(losses)`` returns the same α
every step. Y is m x K (one label column per task; for classification, the authors' setting
was multi-label, so a column is a 0/1 vector).

Left out: the paper's other proposal, covariance alignment (Algorithm 1: a learned d x d
matrix R_i per task in front of the shared module; it is an architecture change, not a
weighting) and its covariance similarity score (Eq. 5), and the theory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


def svd_task_weights(inputs: Tensor, labels: Tensor, rank: int) -> Tensor:
    """Algorithm 2: α_i = ||U_rᵀ Xᵀ y_i|| with U_r the top-r left singular vectors of XᵀY."""
    if inputs.ndim != 2 or labels.ndim != 2 or len(inputs) != len(labels):
        raise ValueError(f"need X (m x d) and Y (m x K), got {tuple(inputs.shape)} and {tuple(labels.shape)}")
    if not 1 <= rank <= labels.shape[1]:
        raise ValueError(f"rank must be in 1..{labels.shape[1]}, got {rank}")
    thetas = inputs.double().T @ labels.double()  # column i: θ_i = Xᵀ y_i
    left, _, _ = torch.linalg.svd(thetas, full_matrices=False)
    principal = left[:, :rank]  # U_r
    return (principal.T @ thetas).norm(dim=0)  # ||U_rᵀ θ_i||


class SVDTaskReweighting(LossWeighting):
    """Fixed loss weights from the SVD of the per-task correlations Xᵀ y_i."""

    name = "svd_reweighting"

    def __init__(self, inputs: Tensor, labels: Tensor, rank: int = 1, normalize: bool = False) -> None:
        super().__init__()
        alpha = svd_task_weights(inputs, labels, rank)
        total = float(alpha.sum())
        if normalize and total > 0:
            alpha = alpha * len(alpha) / total
        self.register_buffer("alpha", alpha)

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        if losses.numel() != len(self.alpha):
            raise ValueError(f"{losses.numel()} losses for {len(self.alpha)} task weights")
        return self.alpha.clone().to(device=losses.device, dtype=losses.dtype)  # a copy, not a view of the state
