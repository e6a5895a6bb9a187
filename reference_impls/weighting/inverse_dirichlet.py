"""Inverse-Dirichlet weighting.

Maddu, Sturm, Müller & Sbalzarini, "Inverse Dirichlet weighting enables reliable training
of physics informed neural networks", Machine Learning: Science and Technology 3(1)
015026, 2022, arXiv:2107.00940 (DOI 10.1088/2632-2153/ac3712).

The losses of a physics-informed network (data fit, equation residuals of different
derivative orders) can differ by orders of magnitude in how strongly they pull on the
shared parameters, and the weakest ones are then barely trained. Inverse-Dirichlet
weighting measures that pull by the spread (standard deviation over the parameters) of
each task's gradient and weighs every task up to the largest spread:

    λ̂_k = max_t std(∇L_t) / std(∇L_k)
    λ_k ← (1 - α) λ_k + α λ̂_k,        λ_k = 1 at the start, α = 0.5
    update = Σ_k λ_k ∇L_k

so for fixed gradients every weighted gradient λ_k ∇L_k ends up with the same spread, that
of the widest-spread task (whose weight tends to 1). Being a spread, not a norm, the
statistic ignores any constant offset shared by all entries of a gradient. α = 0.5 and
the moving average follow the authors' code (``mosaic-group/inverse-dirichlet-pinn``).
Those scripts fix one reference term in the numerator; the max over tasks here is the
general form, and the two agree when the reference is the widest-spread task. Equation
numbers are not cited: no copy of the paper's text was at hand to check them.

The standard deviation is the population one (divisor d): only ratios of spreads of
d-vectors enter, so the divisor cancels, and a single parameter (d = 1) does not give
NaN. A task whose gradient has no spread (zero or constant) has no defined ratio and keeps
its current λ_k. Stateful: one object per run, and the number of tasks may not change.
λ is computed from detached gradients, so autograd sees it as a constant: the update's
derivative with respect to row k is λ_k.

Left out: the per-layer pooling of the variance in the authors' sobolev.py (their shared
helper, used by two of their three problems, takes one std over the flattened gradient, as
here; checked in the audit against ``pinnutils.loss_grad_std_full``), updating λ only every
few epochs as their scripts do, and the PINN problems.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class InverseDirichlet(GradientMethod):
    """Weights from a moving average of max_t std(g_t) / std(g_k); update Σ λ_k g_k."""

    name = "inverse_dirichlet"

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.lambdas: Tensor | None = None  # float64, created on the first call

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        self.update_lambdas(grads.detach().to(torch.float64))
        weights = self.lambdas.to(grads.dtype)
        return Aggregation(update=weights @ grads, weights=weights)

    def update_lambdas(self, grads: Tensor) -> None:
        """One step of λ̂_k = max_t std(g_t) / std(g_k) and the moving average, in place."""
        k = len(grads)
        if self.lambdas is None:
            self.lambdas = torch.ones(k, dtype=torch.float64, device=grads.device)
        if len(self.lambdas) != k:
            raise ValueError(f"InverseDirichlet was set up for {len(self.lambdas)} tasks, got {k}")
        lambdas = self.lambdas.to(grads.device)
        spread = grads.std(dim=1, correction=0) if grads.shape[1] else grads.new_zeros(k)
        live = spread > 0
        if not live.any():
            return
        target = spread.max() / torch.where(live, spread, 1.0)  # λ̂_k
        smoothed = (1 - self.alpha) * lambdas + self.alpha * target
        self.lambdas = torch.where(live, smoothed, lambdas)
