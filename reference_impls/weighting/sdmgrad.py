"""SDMGrad: MGDA's min-norm direction pulled toward the average gradient by a weight λ.

Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023, arXiv:2305.18409.

MGDA looks for the common descent direction closest to zero; SDMGrad regularises that search
toward a target direction g_0, here the average gradient (1/K) Σ_k g_k, i.e. the direction of
plain multi-task training. The direction comes from a problem over the simplex Δ (the one
the authors' code minimises):

    w* = argmin_{w ∈ Δ} ½ ||g_w + λ g_0||²,        g_w = Σ_k w_k g_k,
    update = (g_w* + λ g_0) / (1 + λ).

λ = 0 is exactly MGDA; as λ → ∞ the update tends to g_0. The division by 1 + λ follows the
authors' code (it keeps the update a convex combination of the gradients, so λ changes its
direction, not its scale): the update weights are (w*_k + λ/K) / (1 + λ) and sum to 1.

The paper solves for w with stochastic projected gradient steps on Δ (a few per training step,
warm-started from the previous w, with two independent mini-batches in the product of
gradients). ``iterations=n`` runs a deterministic version of that inner loop: n steps
w <- Π_Δ(w − η M (w + λ1/K)) with M the Gramian, warm-started from the previous call's w
(uniform on the first call),
with the safe step η = 1/λ_max(M) instead of the authors' momentum SGD on a rescaled M. By default (``iterations=None``) w* is found exactly instead: because
Σ w_k = 1, g_w + λ g_0 = Σ_k w_k (g_k + λ g_0), so w* is MGDA's min-norm point of the shifted
rows g_k + λ g_0, whose Gramian is P M P with P = I + (λ/K) 11ᵀ; the exact active-set solver
of ``gradients.min_norm_weights`` then answers with no step size or iteration count. Its
optimality (KKT) conditions are (g_k + λ g_0) · d' >= ||d'||² for every k, d' = g_w* + λ g_0,
with equality where w*_k > 0. Equation numbers are not cited: no copy of the paper's text was
at hand to check them.

What λ does, seen from the update's weights v = (w* + λ/K) / (1 + λ): the shifted rows' hull is
(1 + λ) times the part of the rows' hull with every v_k >= λ / (K (1 + λ)), so the update is
MGDA's min-norm point over weights floored there. Where MGDA's own weights all clear the floor,
SDMGrad's update is MGDA's; λ acts only through tasks MGDA would weight less than the floor.

Left out: the double sampling of the stochastic algorithm (we see one gradient matrix),
SDMGrad-OS, the variant that samples a subset of objectives each step, and the factor K by
which the authors' NYUv2 trainer multiplies the update (to match a summed loss's scale).
Checked against OptMN-Lab/sdmgrad at 8333f9e (methods/weight_methods.py). With its step size
(lr 10 on a Gramian of unit diagonal) its 20 inner steps usually do not reach w*: in the
audit's re-implementation they jumped between simplex vertices and ended more than 0.1 (L1)
from w* in about half of random three-task cases, so its update can differ a lot from this
file's exact one. TorchJD's and LibMTL's copies of that loop (learning rates 10 and 5) do the
same at their defaults, and reach this file's update once the step is 0.5: see
docs/benchmarks-peers.md. The official code's three gradient buffers are one tensor
(``[tensor] * 3``), so its double sampling uses the last extra batch's gradients for all three;
it clips the shared gradient norm to 1; the class default there is λ = 0.6 (the function's and the scripts' 0.3 here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.checks import require_positive
from reference_impls.weighting.base import Aggregation, GramianWeighting, check_gradient_matrix
from reference_impls.weighting.gradients import min_norm_weights, normalized_gramian, project_onto_simplex


class SDMGrad(GramianWeighting):
    """Min-norm weights of the rows shifted by λ g_0, mixed with the mean; weights sum to 1."""

    name = "sdmgrad"

    def __init__(self, lam: float = 0.3, iterations: int | None = None) -> None:
        if lam < 0:
            raise ValueError("lam must be non-negative")
        self.lam = lam  # 0.3 is the default of the authors' code and of LibMTL
        if iterations is not None:
            require_positive(iterations=iterations)
        self.iterations = iterations
        self.simplex_weights: Tensor | None = None  # w*, kept to warm-start the iterative solve

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        return super().__call__(grads)

    def solve(self, gramian: Tensor) -> Tensor:
        """w* on the simplex (exactly, or by ``iterations`` projected-gradient steps)."""
        matrix, _ = normalized_gramian(gramian)  # w* does not depend on the scale
        k = len(matrix)
        pull = torch.full((k,), self.lam / k, dtype=matrix.dtype, device=matrix.device)
        if self.iterations is None:
            shift = torch.eye(k, dtype=matrix.dtype, device=matrix.device) + pull[:, None]  # P
            return min_norm_weights(shift @ matrix @ shift.T)
        return self._projected_gradient(matrix, pull)

    def _projected_gradient(self, matrix: Tensor, pull: Tensor) -> Tensor:
        k = len(matrix)
        w = self.simplex_weights
        if w is None or len(w) != k:
            w = torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
        w = w.to(matrix)
        lipschitz = float(torch.linalg.eigvalsh(matrix).max())
        if lipschitz > 0:
            for _ in range(self.iterations):
                w = project_onto_simplex(w - matrix @ (w + pull) / lipschitz)
        return w

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        w = self.solve(gramian)
        self.simplex_weights = w
        return ((w + self.lam / len(w)) / (1 + self.lam)).to(gramian.dtype)
