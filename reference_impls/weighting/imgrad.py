"""IMGrad: CAGrad made sensitive to how imbalanced the task gradients are.

Zhou, Liu, Zhao & Gong, "Injecting Imbalance Sensitivity for Multi-Task Learning",
IJCAI 2025, arXiv:2503.08006.

The paper argues that gradient methods target conflict but miss imbalance: one task's
gradient dominating the others. It measures imbalance by how far the average gradient
g_0 = (1/K) Σ_k g_k points from the MGDA direction g_m (the min-norm point of the gradients'
convex hull, which weighs every task so none dominates):

    ρ = cos(g_0, g_m) ∈ [0, 1]       (1: balanced, g_0 already is MGDA's direction).

(ρ >= 0 always: g_m · g_k >= ||g_m||² for every k, so g_m · g_0 >= 0.) This ρ is the paper's
cos θ, which replaces the weight μ of Eq. 8 in Eq. 9. Starting from CAGrad's problem (Eq. 2),
IMGrad then mixes CAGrad's two dual terms, the average-gradient term and the worst-case
(MGDA-like) norm term, with weights set by ρ (Eqs. 9-11), and solves over the simplex

    min_w (1.5 − ρ) g_w · g_0 + ρ c ||g_0|| ||g_w||,     g_w = Σ_k w_k g_k,

before taking CAGrad's step d = g_0 + (c ||g_0|| / ||g_w*||) g_w* (the step given after
Eq. 7, reading √φ there as c ||g_0||, the radius of Eq. 2). Dividing by 1.5 − ρ shows
this is CAGrad's dual with radius c' = ρ c / (1.5 − ρ): balanced gradients get up to twice
the conflict aversion (c' = 2c at ρ = 1). As ρ -> 0 the norm term fades and the dual only
minimises g_w · g_0, so g_w* moves to the task gradients least aligned with g_0 (the min-norm
point of that face of the simplex, the limit of the dual as c' -> 0+); the step keeps length
c, so d = g_0 + c ||g_0|| g_w*/||g_w*|| there as well (the official solver does the same on
its linear objective at ρ = 0, which it reaches when g_m = 0). We solve the dual exactly with
``CAGrad.solve_dual`` and MGDA with ``gradients.min_norm_weights``.

The objective above, including the constant 1.5, is the official code's
(github.com/zzpustc/IMGrad, nyuv2/utils.py, ``imgrad``), not the paper's. Writing ρ for cos θ
and √φ = c ||g_0||, the paper's Eq. 9 is (1 − ρ)(g_w · g_0 + √φ ||g_w||) + ρ ||g_w||², and its
simplified objective (Eq. 11) is (1 − ρ) g_w · g_0 + ρ √φ ||g_w||², with weight 1 − ρ (not
1.5 − ρ) and a *squared* norm; we follow the code. The step length c (not c') agrees with both.
Equation numbers were checked in a Markdown conversion of arXiv:2503.08006v1 in the GitHub
file index (index id 66191044723); that text has no appendix. ``last_imbalance`` holds ρ.

Default c = 0.5: the default of the official ``imgrad(grads, alpha=0.5, ...)`` and of its
trainer ``multi_task_mgd_trainer(..., alpha=0.5)`` (same file). Note that the authors' run
scripts (``nyuv2/run.sh``, ``cityscapes/run.sh``) pass ``--alpha 0.8`` for their IMGrad runs.

Convention: *mean*-scaled like ``cagrad``: c = 0 gives g_0. The official training divides
d by 1 + c² and multiplies by K; we return d itself. If g_w* = 0 (e.g. at ρ = 0 when the
least aligned face holds two opposite gradients), the step direction is undefined and we
return g_0, which there is already the projection ``cagrad`` returns in that case. The
authors' two-task Cityscapes version applies the (1.5 - ρ) factor to only part of its
objective (operator precedence, cityscapes/utils.py); we follow the NYUv2 version.

Left out: the paper's extension of the same idea to Nash-MTL (Sec. 5.2, Eqs. 12-13, details
in the appendix), which reuses the previous step's imbalance when the current step conflicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GramianWeighting, check_gradient_matrix
from reference_impls.weighting.cagrad import CAGrad
from reference_impls.weighting.gradients import min_norm_weights, normalized_gramian, rounding_cutoff


class IMGrad(GramianWeighting):
    """CAGrad step with a dual whose conflict aversion grows with ρ = cos(g_0, g_MGDA)."""

    name = "imgrad"

    def __init__(self, c: float = 0.5) -> None:
        if c < 0:
            raise ValueError("c must be non-negative")
        self.c = c
        self.last_imbalance: float | None = None

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        return super().__call__(grads)

    @staticmethod
    def imbalance(matrix: Tensor, cutoff: float = 1e-12) -> float:
        """ρ = cos(g_0, g_m) from a Gramian; 0 when either vector vanishes.

        "Vanishes" is judged on the squared norms, which are what the Gramian holds: a g_m that
        is exactly 0 (0 in the hull) comes out of a float64 solve with ||g_m||² ~ 1e-16, i.e.
        ||g_m|| ~ 1e-8, and its cosine with g_0 would be rounding noise, not an imbalance.
        """
        k = len(matrix)
        mean = torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        mgda = min_norm_weights(matrix)
        mean_sq, mgda_sq = abs(float(mean @ matrix @ mean)), abs(float(mgda @ matrix @ mgda))
        if min(mean_sq, mgda_sq) <= cutoff * float(matrix.diagonal().max()):
            return 0.0
        return min(max(float(mean @ matrix @ mgda) / (mean_sq * mgda_sq) ** 0.5, 0.0), 1.0)

    @staticmethod
    def least_aligned_weights(matrix: Tensor) -> Tensor:
        """The dual's minimiser as c' -> 0+: min g_w · g_0 leaves the face of the tasks with the
        smallest g_k · g_0, and the norm term picks that face's min-norm point."""
        k = len(matrix)
        pull = matrix @ torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        face = pull <= pull.min() + 1e-12  # the matrix is normalised: entries are at most 1
        weights = torch.zeros_like(pull)
        weights[face] = min_norm_weights(matrix[face][:, face])
        return weights

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        matrix, scale = normalized_gramian(gramian)
        k = len(matrix)
        mean = torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        rho = self.imbalance(matrix, rounding_cutoff(gramian.dtype, floor=1e-12)) if scale > 0 else 0.0
        self.last_imbalance = rho
        # (1.5 − ρ)·[g_w·g_0 + ρc/(1.5 − ρ)·||g_0||·||g_w||]: CAGrad's dual with radius c'.
        if rho > 0:
            weights, _ = CAGrad(c=rho * self.c / (1.5 - rho)).solve_dual(matrix)
        else:  # c' = 0, where CAGrad's solver would return the mean
            weights = self.least_aligned_weights(matrix)
        mean_norm = abs(float(mean @ matrix @ mean)) ** 0.5
        combined_norm = abs(float(weights @ matrix @ weights)) ** 0.5
        if scale == 0.0 or combined_norm <= 1e-8:
            return mean.to(gramian.dtype)
        # d = g_0 + (c·||g_0|| / ||g_w*||) g_w*, step length from c as in the official code.
        return (mean + self.c * mean_norm / combined_norm * weights).to(gramian.dtype)
