"""FairGrad: α-fair allocation of the loss decrease among tasks.

Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, arXiv:2402.15638.
Each task's "resource" is its first-order decrease g_k · d. Maximising the α-fair utility
Σ_k (g_k · d)^(1−α) / (1−α) over a ball leads to d = Σ_k w_k g_k with w > 0 solving

    (G Gᵀ w)_k = w_k^(−1/α)   for every k.

α = 1 is proportional fairness (Nash-MTL's system); as α grows, w^(−1/α) -> 1 and the
system tends to Mw = 1, equal first-order decreases (max-min fairness); as α -> 0 the
weights tend to 1 (the utilitarian sum of gradients). We solve the system to machine
precision by damped Newton on the strictly convex ½ wᵀMw − Σ h(w_k), h' = w^(−1/α)
(``gradients.solve_power_system`` with p = 1/α; the official code uses a generic
least-squares solver). When no positive solution exists (0 in the convex hull of the
gradients) we return the zero update and flag ``exact=False``, as for Nash-MTL; for α < 1
the utility maximisation may then still have a boundary solution, which we do not compute.

Convention: the weights are the w of the paper, not normalised; the update scales like
a^((1−α)/(1+α)) when every gradient is multiplied by a (invariant for α = 1).

Left out: the official training code clips the shared parameters' gradient norm to
``max_norm`` = 1 after writing the FairGrad update; that is the training loop's job. Also
there (OptMN-Lab/fairgrad at 2b8cba1): the update is multiplied by K; where the system has no
solution its least-squares solver still returns a step (zero here); its reinforcement-learning
variant takes 20 SGD steps instead; its run scripts use α = 2.
"""

from __future__ import annotations

from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import PowerSolution, solve_power_system


class FairGrad(GramianWeighting):
    """w solving (Mw)_k = w_k^(−1/α); ``last_solution.residual`` reports the check."""

    name = "fairgrad"

    def __init__(self, alpha: float = 1.0, tol: float = 1e-12) -> None:
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        self.alpha = alpha
        self.tol = tol
        self.last_solution: PowerSolution | None = None

    def solve(self, gramian: Tensor) -> PowerSolution:
        return solve_power_system(gramian, power=1.0 / self.alpha, tol=self.tol)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        self.last_solution = self.solve(gramian)
        return self.last_solution.weights.to(gramian.dtype)
