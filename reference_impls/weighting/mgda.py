"""MGDA: the minimum-norm point of the convex hull of the task gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
Comptes Rendus Mathématique 2012; used for deep multi-task learning by Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, arXiv:1810.04650.

The update is d = Σ_k α_k g_k with (Sener & Koltun's Eq. 3)
    α = argmin_{α ∈ simplex} ||Σ_k α_k g_k||² = argmin αᵀ (G Gᵀ) α.
Either d = 0 (the point is Pareto-stationary) or -d decreases every loss, because the
optimality (KKT) conditions give g_k · d >= ||d||² for every k, with equality for the tasks
with α_k > 0.

Sener & Koltun solve this with Frank–Wolfe (Algorithm 2), whose line search is the closed
form for K = 2 (Eq. 4, clipped to [0, 1]). Here it is solved
*exactly* on the K x K Gramian by an active-set method (``gradients.min_norm_weights``), so
no iteration count or stopping tolerance changes the answer and K = 2 weights are not
clipped. Convention: α sums to 1 (a convex combination, not the package's default sum).

Left out: the authors' code's optional normalisation of each task gradient before the solver
(by its L2 norm, its loss, or both; not part of the paper; its only example configuration,
sample.json, turns on "loss+"). Its training script solves by projected gradient descent from
the best pair, not the paper's Frank-Wolfe (intel-isl/MultiObjectiveOptimization,
min_norm_solvers.py); its loop can stop early, where the solver here is exact. Their code also back-propagates
Σ α_k L_k into the task heads; here the heads get their plain gradients, as in the paper's
algorithm for the task-specific parameters (Algorithm 2, line 2).

Equation numbers are Sener & Koltun's, checked in a PDF-to-text transcript of
arXiv:1810.04650v2 (11 January 2019, the NeurIPS 2018 paper) in the GitHub file index
(index id 52686274209).
"""

from __future__ import annotations

from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import min_norm_weights


class MGDA(GramianWeighting):
    """Exact min-norm convex combination of the rows; weights on the simplex."""

    name = "mgda"

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return min_norm_weights(gramian).to(gramian.dtype)
