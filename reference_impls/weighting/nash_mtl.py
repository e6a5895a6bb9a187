"""Nash-MTL: the Nash bargaining solution between tasks.

Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017.
Tasks bargain over an update d with utility g_k · d and disagreement point d = 0. The Nash
bargaining solution (Eq. 1, every disagreement payoff 0) maximises Σ_k log(g_k · d) in a
ball, and the paper shows (Claim 3.1) that d = Σ_k α_k g_k where α > 0 solves

    (G Gᵀ α)_k = 1 / α_k   for every k,        (Claim 3.1; row k is Eq. 2; Algorithm 1)

i.e. every task gets g_k · d = 1/α_k. Here G holds the gradients as rows, so G Gᵀ is the
Gramian M; the paper's G holds them as columns and writes GᵀGα = 1/α. Row k, written out, is

    α_k ||g_k||² + Σ_{j≠k} α_j g_j · g_k = 1 / α_k                                  (Eq. 2)

so orthogonal gradients get α_k = 1/||g_k|| (Sec. 3.1), and ||d||² = Σ_k α_k (g_k · d) = K
(proof of Theorem 5.4, App. A). Algorithm 1 steps θ − η Σ_k α_k g_k with this α. The paper
approximates α with a sequence of convex programs (the surrogate of Eq. 4, then
concave-convex steps on Eq. 5 whose objective is Eq. 3's plus Σ_k β_k; at most 20 steps in
its experiments, 1 on MT10); its text names no solver, the official code uses cvxpy. Here
the system is solved exactly by damped Newton on the strictly convex ½ αᵀMα − Σ log α_k
(``gradients.solve_power_system`` with p = 1), to a residual of 1e-12 or, for nearly
opposite gradients, float64's rounding floor; the residual max_k |α_k (Mα)_k − 1| is
returned by ``solve`` and stored in ``last_solution``.

A solution exists iff no non-negative combination of the gradients vanishes, i.e. some
direction improves every task. Otherwise (a zero gradient, two opposite gradients, more
tasks than dimensions...) the only agreement is the disagreement point: we return the zero
update with weights 0 and flag ``exact=False`` (the same answer MGDA gives there). Rows that
float64 cannot tell from opposite (1 + cos near its epsilon) are answered the same way. The
paper does not treat this case: it assumes the gradients are linearly independent away from
Pareto-stationary points (Sec. 3.1, Assumption 5.1).

Convention: the weights are the α of the paper (no normalisation). The update is invariant
to the scale of the gradients: multiplying every g_k by a > 0 divides α by a.
The official code (AvivNavon/nash-mtl, methods/weight_methods.py) re-solves every step by
default, as here (reusing α for a few steps is an option there, the speed-up of the
paper's Sec. 3.3), and caps the update norm; it also gives each task head its gradient
times α_k (the caller gives heads their plain gradient here), and where no bargaining
solution is found it keeps the previous α (all ones at first, the summed gradient), where
this file returns a zero update.

Equation numbers were checked in a Markdown conversion of arXiv:2202.01017v2 (arXiv's HTML
page) in the GitHub file index (index id 66279867131).
"""

from __future__ import annotations

from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import PowerSolution, solve_power_system


class NashMTL(GramianWeighting):
    """α solving (Mα)_k = 1/α_k (Eq. 2) exactly; ``last_solution.residual`` reports the check."""

    name = "nash_mtl"

    def __init__(self, tol: float = 1e-12) -> None:
        self.tol = tol
        self.last_solution: PowerSolution | None = None

    def solve(self, gramian: Tensor) -> PowerSolution:
        return solve_power_system(gramian, power=1.0, tol=self.tol)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        self.last_solution = self.solve(gramian)
        return self.last_solution.weights.to(gramian.dtype)
