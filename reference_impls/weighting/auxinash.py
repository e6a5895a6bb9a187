"""AuxiNash: auxiliary learning as an asymmetric Nash bargaining game.

Shamsian, Navon, Glazer, Kawaguchi, Chechik & Fetaya, "Auxiliary Learning as an Asymmetric
Bargaining Game", ICML 2023, arXiv:2301.13501.

Nash-MTL lets all tasks bargain as equals over the shared update d (task k's utility is its
first-order improvement g_k · d). In auxiliary learning one task matters and the others
only help, so AuxiNash gives each task a bargaining power p_k > 0 and takes the asymmetric
(generalised) Nash bargaining solution

    max_d  Σ_k p_k log(g_k · d)   over a ball around 0.

Its stationarity condition Σ_k p_k g_k / (g_k · d) ∝ d gives d = Σ_k α_k g_k with α > 0 solving

    α_k (G Gᵀ α)_k = p_k   for every k,

so task k improves by g_k · d = p_k / α_k and ||d||² = Σ_k p_k. With equal powers this is
Nash-MTL's system. As in the official code the powers are clamped at ``min_preference``
(default 1e-4, its ``min_pref_clamp`` in methods/weight_methods.py) and rescaled to sum to
K (equal powers are then all 1).

The system is the stationarity condition of the strictly convex ½ αᵀMα − Σ_k p_k log α_k,
which we minimise exactly by damped Newton (the official code runs a sequence of cvxpy
programs). As for Nash-MTL, a solution exists iff 0 is outside the convex hull of the
gradients; otherwise we return the zero update and flag ``exact=False``.

The powers are learned, not fixed: every few steps the paper moves p to lower the main
task's validation loss, differentiating through the solution with the implicit function
theorem, dα/dp = (M + diag(p/α²))⁻¹ diag(1/α) (``alpha_jacobian``). ``preference_step``
applies that chain rule to a gradient of the validation loss with respect to α, which the
caller supplies.

Paper equation numbers are not cited: we could not read the paper's text, only its
abstract and the official code (github.com/AvivSham/auxinash), from which the rules above
are taken.

Left out: the official code's update-norm clipping (it solves the system for the Gramian
divided by its Frobenius norm s but multiplies s back into its constraints, so its α is on
the raw scale, as here: the audit's side-by-side run agreed within 1.7e-6 on 29 of 30 cases,
dα/dp to 1.9e-8; it then clips the shared update to norm 1, which always applies there since
the update's squared norm is K), its weighting of the task heads' gradients by α_k, its
keeping of the previous α (all ones at first) where no solution is found (a zero update
here), its preference step (gradient clipped to norm 1, SGD with momentum 0.9 at lr 5e-3,
every 25 steps), and the implicit-differentiation estimate of ∂L_val/∂α through the network
parameters (a truncated Neumann series over training batches); the caller provides that
gradient here. Checked against AvivSham/auxinash at 2e411c9.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import PowerSolution, certified, min_norm_weights, normalized_gramian


class AuxiNash(GramianWeighting):
    """α solving α_k (Mα)_k = p_k exactly, for bargaining powers p (``preferences``)."""

    name = "auxinash"
    training_hook = "preference_step"  # learned preferences need a validation gradient

    def __init__(
        self, preferences: Sequence[float] | Tensor | None = None,
        min_preference: float = 1e-4, tol: float = 1e-12,
    ) -> None:
        self.min_preference = min_preference
        self.tol = tol
        self.preferences: Tensor | None = None
        if preferences is not None:
            self.set_preferences(preferences)
        self.last_solution: PowerSolution | None = None
        self._last_gramian: Tensor | None = None

    def set_preferences(self, preferences: Sequence[float] | Tensor) -> None:
        """Clamp at ``min_preference`` and rescale to sum to K (the official convention)."""
        p = torch.as_tensor(preferences, dtype=torch.float64).detach().cpu().reshape(-1)
        p = p.clamp_min(self.min_preference)
        self.preferences = p / p.sum() * len(p)

    def _powers(self, k: int) -> Tensor:
        if self.preferences is None:
            return torch.ones(k, dtype=torch.float64)
        if len(self.preferences) != k:
            raise ValueError(f"{len(self.preferences)} preferences for {k} tasks")
        return self.preferences

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        self._last_gramian = gramian.detach()
        self.last_solution = solve_asymmetric_nash(gramian, self._powers(len(gramian)), self.tol)
        return self.last_solution.weights.to(gramian.device, gramian.dtype)

    def alpha_jacobian(self) -> Tensor:
        """dα/dp at the last solution (implicit function theorem on Mα − p/α = 0)."""
        if self.last_solution is None or not self.last_solution.exact:
            raise RuntimeError("no exact solution to differentiate; call the method first")
        alpha = self.last_solution.weights.to("cpu", torch.float64)
        gram = self._last_gramian.to("cpu", torch.float64)
        p = self._powers(len(alpha))
        hessian = gram + torch.diag(p / alpha**2)
        return torch.linalg.solve(hessian, torch.diag(1.0 / alpha))

    def preference_step(self, alpha_gradient: Tensor, lr: float) -> Tensor:
        """One gradient step on p given dL_val/dα; returns dL_val/dp and updates p."""
        k = len(alpha_gradient)
        grad_p = alpha_gradient.detach().to("cpu", torch.float64) @ self.alpha_jacobian()
        self.set_preferences(self._powers(k) - lr * grad_p)
        return grad_p


def solve_asymmetric_nash(gramian: Tensor, powers: Tensor, tol: float = 1e-12, max_iter: int = 100) -> PowerSolution:
    """Solve α_k (Mα)_k = p_k, α > 0; residual = max_k |α_k (Mα)_k / p_k − 1|.

    Works on the normalised Gramian M̂ = M/s: if α̂ solves it, α = α̂/√s solves the original.
    """
    matrix, scale = normalized_gramian(gramian)
    k = len(matrix)
    no_solution = PowerSolution(torch.zeros(k, dtype=matrix.dtype, device=matrix.device), float("inf"), False)
    if scale == 0.0:
        return no_solution
    hull = min_norm_weights(matrix)
    if float(hull @ matrix @ hull) <= 1e-14:  # 0 in the hull: no direction helps every task
        return no_solution
    found = _newton(matrix.to("cpu", torch.float64).numpy(), powers.numpy(), tol, max_iter)
    if found is None:
        return no_solution
    alpha, residual = found
    weights = torch.from_numpy(alpha / np.sqrt(scale)).to(matrix.device, matrix.dtype)
    return PowerSolution(weights, residual, True)


def _objective(m: np.ndarray, p: np.ndarray, a: np.ndarray) -> float:
    return float(0.5 * a @ m @ a - p @ np.log(a))


def _newton(m: np.ndarray, p: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, float] | None:
    """Damped Newton on ½ αᵀMα − Σ p_k log α_k; None if it does not converge.

    Start on the ray through α_k = √(p_k / M_kk) (exact for orthogonal gradients), at its
    best point c² = Σp / uᵀMu. Steps are cut to stay positive, then backtracked (Armijo).
    The stopping test allows for float64 rounding in (Mα)_k when it is a small difference
    of large terms (nearly opposite gradients), as ``gradients.rounding_floor`` does, and
    like it accepts no residual that cannot prove a solution exists (``gradients.certified``).
    """
    u = np.sqrt(p / np.diagonal(m))
    a = u * np.sqrt(p.sum() / (u @ m @ u))
    abs_m, eps = np.abs(m), np.finfo(np.float64).eps
    for _ in range(max_iter):
        if not (np.isfinite(a).all() and a.max() < 1e12):
            return None
        ma = m @ a
        residual = float(np.abs(a * ma / p - 1).max())
        floor = 4 * len(a) * eps * float((a * (abs_m @ a) / p).max())
        if certified(residual, tol, floor):
            return a, residual
        gradient = ma - p / a
        step = -np.linalg.lstsq(m + np.diag(p / a**2), gradient, rcond=None)[0]
        slope = float(gradient @ step)
        shrinking = step < 0
        t = min(1.0, 0.95 * float((-a[shrinking] / step[shrinking]).min())) if shrinking.any() else 1.0
        # Backtrack unless the predicted decrease is below the rounding of f itself: f
        # cannot judge such a step, and this close to the minimiser Newton's step is right.
        f0 = _objective(m, p, a)
        rounding = len(a) * eps * float(0.5 * a @ abs_m @ a + p @ np.abs(np.log(a)))
        if -slope > 16 * rounding:
            while t > 1e-12 and _objective(m, p, a + t * step) > f0 + 1e-4 * t * slope:
                t /= 2
            if t <= 1e-12:
                return None
        a = a + t * step
    return None
