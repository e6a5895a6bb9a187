"""Learning-rate annealing (LRA) for physics-informed networks.

Wang, Teng & Perdikaris, "Understanding and mitigating gradient flow pathologies in
physics-informed neural networks", SIAM J. Sci. Comput. 2021, arXiv:2001.04536
(Algorithm 1; DOI 10.1137/20M1318043).

A physics-informed network minimises a PDE-residual loss L_1 plus boundary / data losses
L_2..L_K (the paper's L_r and L_1..L_M). The paper shows that the residual's gradients are
typically orders of magnitude larger than the others, so gradient descent all but ignores the
boundary terms. Its fix (Algorithm 1) weighs each other loss by λ_k (Eq. 37), chosen so that
the weighted term's *average* gradient entry is comparable to the residual's *largest* one,
and smoothed over steps:

    λ̂_k = max_i |∇L_1|_i / mean_i |λ_k ∇L_k|_i        (k = 2..K; Eq. 40, see below)
    λ_k ← β λ_k + (1 - β) λ̂_k                        (Eq. 41 with β = 1 - α, see below)
    update = ∇L_1 + Σ_{k≥2} λ_k ∇L_k                  (Eq. 42)

with λ_k = 1 at the start. Row 0 of the K x d matrix is the reference loss L_1 and keeps
weight 1. Two details follow the authors' TensorFlow code (``Helmholtz2D_model_tf.py``)
and the re-implementation by Maddu et al. (``mosaic-group/inverse-dirichlet-pinn``), which
agree on them, and both differ from the equations printed in arXiv v1: the mean in the
denominator is taken over the gradient of the currently weighted term λ_k L_k (Eq. 40 prints
the mean of the unweighted |∇L_k|), and the moving average keeps β = 0.9 of the previous λ_k
(Eq. 41 is λ_k ← (1 - α) λ_k + α λ̂_k with recommended α = 0.9, which keeps only 0.1 of it).
The first makes a difference: for fixed gradients the iteration settles at λ_k = λ̂_k, i.e.
λ_k² = max|∇L_1| / mean|∇L_k|, the square root of the unweighted ratio (Eq. 40 as printed
settles at the ratio itself). Equation numbers were checked in a PDF-to-text transcript of
arXiv:2001.04536v1 in the GitHub file index (index id 62814157638), whose title reads
"gradient pathologies" without "flow"; the journal version was not checked.

A task whose gradient is zero has no defined ratio and keeps its current λ_k. Stateful:
one object per run, and the number of tasks may not change. The small K-vectors are
computed in float64 and the update returned in the gradients' dtype.

Checked against PredictiveIntelligenceLab/GradientPathologiesPINNs
(Helmholtz/Helmholtz2D_model_tf.py, Klein Gordon/Klein_Gordon_model_tf.py,
Lid-driven Cavity/NS_model_tf.py). Left out: the code's per-layer statistics (the
Helmholtz and Klein-Gordon code take the max over all layers but average per-layer means,
the cavity code takes the largest per-layer ratio; Eq. 40, like us, takes both over the
whole parameter vector, here the flattened d-vector), the code's restriction of these
statistics to the weight matrices (biases are not looked at there; here every entry of a row
counts), updating λ only every 10 steps as the code and the paper's experiments (Sec. 3) do,
and the paper's modified MLP architecture (Eqs. 43-47). The code also computes λ̂ after
the optimizer step, from the new parameters on the same batch, and applies it from the next
step on; here, as in steps (a)-(c) of Algorithm 1, each step's own gradients set the λ used
in that step. In the code one λ weighs a summed group of terms (all four Helmholtz
boundaries share one); to do the same here, pass the group's summed loss as one row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class LRA(GradientMethod):
    """Reference row 0 with weight 1; the others weighted by a moving average of max/mean."""

    name = "lra"

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.lambdas: Tensor | None = None  # λ_2..λ_K (float64), created on the first call

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        self.update_lambdas(grads.detach().to(torch.float64))
        one = torch.ones(1, dtype=torch.float64, device=grads.device)
        weights = torch.cat([one, self.lambdas]).to(grads.dtype)
        return Aggregation(update=weights @ grads, weights=weights)

    def update_lambdas(self, grads: Tensor) -> None:
        """One step of λ̂_k = max|g_1| / mean|λ_k g_k| and the moving average, in place.

        Eqs. 40-41 in the form of the authors' code (see the module docstring).
        """
        k = len(grads)
        if self.lambdas is None:
            self.lambdas = torch.ones(k - 1, dtype=torch.float64, device=grads.device)
        if len(self.lambdas) != k - 1:
            raise ValueError(f"LRA was set up for {len(self.lambdas) + 1} tasks, got {k}")
        lambdas = self.lambdas.to(grads.device)
        reference_max = grads[0].abs().max() if grads.shape[1] else grads.new_zeros(())
        mean_abs = grads[1:].abs().mean(dim=1) if grads.shape[1] else grads.new_zeros(k - 1)
        weighted_mean = lambdas * mean_abs  # mean |λ_k g_k| (λ_k > 0)
        live = weighted_mean > 0
        target = reference_max / torch.where(live, weighted_mean, 1.0)  # λ̂_k
        smoothed = self.beta * lambdas + (1 - self.beta) * target
        self.lambdas = torch.where(live, smoothed, lambdas)
