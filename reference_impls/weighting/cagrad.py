"""CAGrad: the best worst-case improvement within a ball around the average gradient.

Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
arXiv:2110.14048. With g_0 = (1/K) Σ_k g_k (the gradient of the mean loss of Eq. 1) the
primal problem is

    max_d min_k g_k · d    subject to  ||d − g_0|| <= c ||g_0||,                    (Eq. 3)

and its dual (the paper's reduction) is, with g_w = Σ_k w_k g_k and r = c ||g_0|| (the
paper's √φ),

    min_{w ∈ simplex} F(w) = g_w · g_0 + r ||g_w||,     d* = g_0 + (r / ||g_w*||) g_w*.

F is the objective of Algorithm 1 and of Eq. 11 (Lemma A.2, App. A.3); d* is Lemma A.2's
solution and Algorithm 1's update, and min_k g_k · d* = F(w*) (Eq. 12).
So d* = Σ_k (1/K + r w*_k / ||g_w*||) g_k: the weights are a function of the Gramian only.

Exact dual solve (no first-order iterations). Writing r||x|| = min_{t>0} r(||x||²/2t + t/2),
the inner problem for a fixed t is min_w g_w·g_0 + (r/2t)||g_w||², and completing the square
turns it into the min-norm problem (MGDA) for the shifted rows g_k + τ g_0, τ = t/r (because
Σ w_k = 1). This is the paper's intermediate dual in the proof of Lemma A.2 (unnumbered):
τ is its multiplier λ, whose optimum is ||g_w*|| / r. We solve the inner problem exactly
with the active-set solver, and the outer function of t is convex with the sign of its
slope equal to the sign of φ(t) = t − ||g_w(t)||, so we look for the root of φ inside a
bracket. The steps are not blind: on a fixed support S the inner optimality conditions
are linear, M_SS w − ν1 = −τ b_S with 1ᵀw = 1 (b = M·mean), so w = p + τq, and
||g_w|| = t becomes a quadratic equation in τ. Its positive root is the exact answer as
soon as the inner problem at that τ keeps the support S it came from; that usually
happens after 2-3 inner solves (each warm-started from the previous support).
When the step leaves the bracket we bisect instead, so the search still terminates.
``solve_dual`` returns w* for tests.

Convention: *mean*-scaled: c = 0 gives exactly g_0, the mean of the rows. The official
training (Cranial-XIX/CAGrad, nyuv2/utils.py and cityscapes/utils.py) divides d* by (1 + c²)
and multiplies it by K in every run, a step K / (1 + c²) times ours (its toy script divides
by 1 + c); we return the paper's d*. If the dual optimum has g_w* = 0 (0 lies in the
convex hull and is optimal; we test ||g_w*|| <= 1e-8 max_k ||g_k||), the formula for d* is
undefined. The optimal value is then 0 (Eq. 12), so the optimal d are the points of the
ball with g_k · d >= 0 for every k; we return the one nearest g_0, the projection of g_0
onto that cone (the projection UPGrad makes). It lies in the ball because some optimal d
does. (Until 2026-11-24 we returned g_0 itself, which can raise a loss: rows (1, 0),
(−2, 0) with c = 2 gave d = (−0.5, 0); found by comparison with TorchJD.)

The paper takes c in [0, 1) (Algorithm 1; Theorem 3.2 needs c < 1 to converge to a
stationary point of the mean loss), while this class accepts any c >= 0 (large c tends to
MGDA, Sec. 3.1 Remark). Its experiments picked c = 0.4 on NYU-v2 and 0.2 on Cityscapes
(Sec. 5.2; App. B.2 says 0.4 for both), and c = 0.2 gave the lowest mean training loss on
Multi-Fashion+MNIST (Sec. 5.1); 0.5 is our default, not a value from the paper.
The paper leaves the dual to a generic solver and does not treat g_w* = 0.

Equation numbers were checked in a Markdown conversion of arXiv:2110.14048v2 (arXiv's HTML
page) in the GitHub file index (index id 66069043445).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.checks import require_non_negative
from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import min_norm_weights, normalized_gramian
from reference_impls.weighting.upgrad import dual_cone_projection_weights


class CAGrad(GramianWeighting):
    """Conflict-averse direction for radius ``c`` (the paper's c in Eq. 3; default 0.5)."""

    name = "cagrad"

    def __init__(self, c: float = 0.5, max_iterations: int = 100) -> None:
        if c < 0:
            raise ValueError("c must be non-negative")
        require_non_negative(max_iterations=max_iterations)
        self.c = c
        self.max_iterations = max_iterations

    def solve_dual(self, gramian: Tensor) -> tuple[Tensor, float]:
        """Return (w*, r) on the normalised Gramian M̂ = M/s (w* does not depend on s).

        Precision: the inner problems shift every row by τ = t/r, so for a radius r below about
        1e-7 (in units of the largest gradient norm) the τ² term swamps M̂ in float64 and a tie
        between equally aligned tasks is broken arbitrarily; on the rows (-1, 1), (-1, -2), (4, 1)
        w* stays (2/3, 1/3, 0) to 1e-6 down to r = 1e-6 and is a vertex from r = 1e-8 on.
        """
        matrix, _ = normalized_gramian(gramian)
        k = len(matrix)
        mean = torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        pull = matrix @ mean  # b_k = g_k · g_0
        mean_norm_sq = abs(float(mean @ pull))
        radius = self.c * mean_norm_sq**0.5
        if radius == 0.0:
            return mean, 0.0
        # Root of φ(t) = t − ||g_w(t)|| in (0, 1]: ||g_w|| <= max_k ||g_k|| = 1 after normalising.
        low, high = 0.0, 1.0
        weights, norm = self._inner(matrix, pull, mean_norm_sq, low)
        if norm <= 1e-12:  # 0 in the hull makes t = 0 a spurious root: start just right of it
            low = 1e-9 * high
            weights, norm = self._inner(matrix, pull, mean_norm_sq, low / radius)
        if low - norm >= 0:
            return weights, radius  # optimum at (numerically) t = 0: g_w* ≈ 0
        for _ in range(self.max_iterations):
            t = self._root_on_support(matrix, pull, radius, weights > 0)
            exact_step = t is not None and low < t <= high  # the root may be t = 1 (one task)
            t = t if exact_step else (low + high) / 2
            trial, norm = self._inner(matrix, pull, mean_norm_sq, t / radius, support=weights > 0)
            phi = t - norm
            same_support = torch.equal(trial > 0, weights > 0)
            weights = trial
            if abs(phi) <= 1e-15 or (exact_step and same_support):
                break  # the root of φ on the support that the inner problem confirms
            low, high = (t, high) if phi < 0 else (low, t)
            if high - low <= 4 * torch.finfo(matrix.dtype).eps:
                break
        return weights, radius

    @staticmethod
    def _inner(matrix: Tensor, pull: Tensor, mean_norm_sq: float, shift: float, support: Tensor | None = None) -> tuple[Tensor, float]:
        """w(t) = min-norm weights of the rows g_k + shift·g_0, and ||g_w(t)|| (unshifted)."""
        ones = torch.ones_like(pull)
        # Gramian of the shifted rows: M + τ(1bᵀ + b1ᵀ) + τ²||g_0||² 11ᵀ.
        lifted = matrix + shift * (torch.outer(ones, pull) + torch.outer(pull, ones)) + shift**2 * mean_norm_sq
        weights = min_norm_weights(lifted, support=support)
        return weights, abs(float(weights @ matrix @ weights)) ** 0.5

    @staticmethod
    def _root_on_support(matrix: Tensor, pull: Tensor, radius: float, support: Tensor) -> float | None:
        """The t with ||g_w(t)|| = t if the inner support stays ``support``; None if undefined.

        On S: [M_SS  −1; 1ᵀ 0] (w, ν) = (−τ b_S, 1) gives w = p + τq; then (τr)² = ||g_w||²
        is (r² − qᵀMq) τ² − 2 pᵀMq τ − pᵀMp = 0, whose non-negative root we return as t = τr.
        """
        index = support.nonzero().flatten()
        size = len(index)
        block = matrix[index][:, index]
        bordered = torch.zeros(size + 1, size + 1, dtype=matrix.dtype, device=matrix.device)
        bordered[:size, :size], bordered[:size, size], bordered[size, :size] = block, -1.0, 1.0
        rhs = torch.zeros(size + 1, 2, dtype=matrix.dtype, device=matrix.device)
        rhs[size, 0], rhs[:size, 1] = 1.0, -pull[index]
        solution, info = torch.linalg.solve_ex(bordered, rhs)
        if int(info) != 0 or not torch.isfinite(solution).all():
            return None
        p, q = solution[:size, 0], solution[:size, 1]
        pp, pq, qq = (float(u @ block @ v) for u, v in ((p, p), (p, q), (q, q)))
        leading = radius**2 - qq
        if not leading > 0:
            return None
        tau = (pq + (pq**2 + leading * max(pp, 0.0)) ** 0.5) / leading
        return tau * radius

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        weights, radius = self.solve_dual(gramian)
        matrix, _ = normalized_gramian(gramian)
        k = len(matrix)
        mean = torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        norm = abs(float(weights @ matrix @ weights)) ** 0.5
        if radius == 0.0:
            return mean.to(gramian.dtype)
        if norm <= 1e-8:  # d* undefined: the point of the cone {d : Gd >= 0} nearest g_0
            return dual_cone_projection_weights(matrix, mean).to(gramian.dtype)
        return (mean + radius / norm * weights).to(gramian.dtype)
