"""ExcessMTL: task weights driven by each task's estimated excess risk.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
Risks", ICML 2024 (PMLR 235), arXiv:2402.02009.

Loss-driven weightings (GroupDRO-style, "up-weight the worst task") give a noisy-label task
ever more weight, because its loss stays high even once the model has learned all it can.
ExcessMTL weighs tasks by their *excess* risk instead: how far the loss still is above the
best the model could reach, E_k = L_k(θ) − min_θ' L_k(θ'). A converged noisy task has a large
loss but a small excess risk, so it stops attracting weight.

The minimum is unknown, so the paper estimates E_k from a second-order Taylor expansion of
L_k around θ (Eqs. 6-7): minimising the quadratic model over the step gives

    E_k ≈ ½ g_kᵀ H_k⁻¹ g_k,           g_k = ∇L_k(θ),

with the Hessian H_k replaced by a diagonal, AdaGrad-style estimate built from the
task's own gradient history, h_k = sqrt(Σ_{s<=t} g_k(s)² + ε) (element-wise). Because the
tasks' losses live on different scales, each estimate is divided by a baseline E_k(0),
the estimate at the start of training (scale normalisation), and the weights follow an
exponentiated-gradient (multiplicative-weights) step on the simplex (Eq. 9):

    α_k ← α_k · exp(η · E_k / E_k(0)),   then α ← α / Σ α.

The equation numbers were not checked against a text of the paper: they are those TorchJD's
implementation cites. The rule itself was checked against the authors' code
(``yifei-he/ExcessMTL``).
The baseline is the mean estimate over the first ``warmup_steps`` calls (1 = the first
call, as in the authors' code; the paper's appendix collects it over a few epochs); the
weights stay uniform until it exists.

Conventions: the returned weights are K·α (they sum to K, so the first steps equal the
package's equal weighting, the sum of the rows); the authors' code uses the same scaling.
The ½ of the Taylor estimate is kept (it cancels in E_k / E_k(0)). The update runs in log
space so that many steps cannot overflow exp. A task whose baseline is 0 (zero gradient
at the start) has no scale and gets ratio 0.

Interface: a ``GradientMethod`` that keeps state: call it once per step with the K x d
matrix of the shared parameters' gradients (``gradient_step`` does this); d must stay the
same between calls.

Left out: nothing of the weighting rule (it agreed with the authors' code, yifei-he/ExcessMTL,
to 5e-15 in the audit); the paper's label-noise benchmarks and its convergence analysis. Their
task heads get the weighted gradient w_k ∇L_k, where ``gradient_step`` gives them the
unweighted sum.
Our default ``step_size`` of 1.0 is ours; the authors' configuration defaults its robust
step size to 1e-2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import solver_dtype


def excess_risk(grads: Tensor, curvature: Tensor) -> Tensor:
    """Eq. (6): ½ g_kᵀ H_k⁻¹ g_k per row, for a diagonal curvature (K x d, all > 0)."""
    return 0.5 * (grads.square() / curvature).sum(dim=1)


class ExcessMTL(GradientMethod):
    """Multiplicative weights on the simplex, driven by normalised excess-risk estimates."""

    name = "excessmtl"

    def __init__(self, step_size: float = 1.0, warmup_steps: int = 1, eps: float = 1e-7) -> None:
        if step_size <= 0 or warmup_steps < 1:
            raise ValueError(f"need step_size > 0 and warmup_steps >= 1, got {step_size} and {warmup_steps}")
        self.step_size = step_size
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.squared_sum: Tensor | None = None  # Σ_s g_k(s)², K x d
        self.log_alpha: Tensor | None = None  # log of the simplex weights α
        self.baseline_sum: Tensor | None = None
        self.baseline: Tensor | None = None  # E_k(0)
        self.calls = 0

    def estimate(self, grads: Tensor) -> Tensor:
        """Accumulate this step's squared gradients and return the K excess-risk estimates."""
        grads = grads.detach().to(solver_dtype(grads.device))  # float64 where the device has it
        if self.squared_sum is None:
            self.squared_sum = torch.zeros_like(grads)
            self.log_alpha = torch.full((len(grads),), -math.log(len(grads)), dtype=grads.dtype, device=grads.device)
            self.baseline_sum = torch.zeros(len(grads), dtype=grads.dtype, device=grads.device)
        elif self.squared_sum.shape != grads.shape:
            raise ValueError(f"gradient matrix changed shape: {tuple(self.squared_sum.shape)} -> {tuple(grads.shape)}")
        self.squared_sum += grads.square()
        curvature = torch.sqrt(self.squared_sum + self.eps)  # Eq. (7): diagonal AdaGrad estimate of H_k
        return excess_risk(grads, curvature)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        risk = self.estimate(grads)
        self.calls += 1
        if self.baseline is None:
            self.baseline_sum += risk
            if self.calls == self.warmup_steps:
                self.baseline = self.baseline_sum / self.warmup_steps
        else:
            ratio = torch.where(self.baseline > 0, risk / self.baseline.where(self.baseline > 0, 1.0), 0.0)
            # Eq. (9): α_k ← α_k exp(η E_k / E_k(0)), renormalised onto the simplex
            self.log_alpha = torch.log_softmax(self.log_alpha + self.step_size * ratio, dim=0)
        weights = (len(grads) * self.log_alpha.exp()).to(grads.dtype)
        return Aggregation(update=weights @ grads, weights=weights)
