"""MT-SGD: particles pushed by a kernelised (SVGD-style) version of MGDA's common descent direction.

Phan, Tran, Le, Tran, Ho & Phung, "Stochastic Multiple Target Sampling Gradient Descent",
NeurIPS 2022, arXiv:2206.01934.

Each task defines a target density p_k(θ) ∝ exp(−L_k(θ)); MT-SGD moves a set of M particles
θ_1..θ_M (M networks) so that they spread over the region where all targets are high, i.e.
along the Pareto front. For task k, the SVGD direction at particle i, written here in the
package's "use it like a gradient" convention (θ_i <- θ_i − lr d_i), is

    D_k(θ_i) = (1/M) Σ_j [ κ(θ_j, θ_i) ∇L_k(θ_j) − ρ ∇_{θ_j} κ(θ_j, θ_i) ],

a kernel-smoothed gradient plus a repulsion (strength ρ) that keeps particles apart. The K
directions are combined with one weight vector w on the simplex, the min-norm point of
their hull in the kernel's geometry:

    Q_kl = Σ_{i,j} κ(θ_i, θ_j) ∇L_k(θ_i) · ∇L_l(θ_j),     w = argmin_{w ∈ Δ_K} wᵀ Q w,
    d_i = Σ_k w_k D_k(θ_i).

Q is MGDA's Gramian with particles coupled by κ, and its KKT conditions, (Q w)_l >= wᵀQw for
every l, say that the combined flow decreases every task in that geometry (tested). With one
particle κ = 1 and the repulsion vanishes, so the method *is* MGDA (tested): that is how
``method(grads)`` on a plain K x d matrix behaves, so it runs wherever a ``GradientMethod``
does. ``particle_updates(particles, grads)`` is the M-particle step on lists of parameter
vectors. κ is the RBF kernel exp(−||a − b||² / h) with the authors' median bandwidth
h = median(||θ_i − θ_j||²) / log(M + 1) (h = 1 when all particles coincide), or a fixed h.

Left out: the authors' split of shared and task-specific parameters with kernels on
network outputs and latent features (here the kernel acts on the parameter vectors given),
their warm-up epochs (fixed per-particle weights on Multi-MNIST, per-particle MGDA on
SARCOS), the normalisation of the task gradients before the weighting matrix that every
published run of theirs applies, each a little differently (on one random case it moved the
weights from (0.23, 0.62, 0.14) to (0.22, 0.47, 0.31)), their clipping of two-task weights
to 0.999 / 0.001, and equation numbers (no copy of the
paper's text was at hand to check them; the formulas are those of the authors' code,
VietHoang1512/MT-SGD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import min_norm_weights


class MTSGD(GradientMethod):
    """Kernel-coupled min-norm weights shared by all particles, plus SVGD repulsion."""

    name = "mt_sgd"
    training_hook = "particle_updates"  # M model copies; with one particle it is plain MGDA

    def __init__(self, repulsion: float = 1.0, bandwidth: float | None = None) -> None:
        if repulsion < 0 or (bandwidth is not None and not bandwidth > 0):
            raise ValueError("repulsion must be >= 0 and bandwidth > 0")
        self.repulsion = repulsion
        self.bandwidth = bandwidth
        self.last_weights: Tensor | None = None

    def __call__(self, grads: Tensor) -> Aggregation:
        """One particle: κ = 1, no repulsion, so the update is MGDA's min-norm combination."""
        check_gradient_matrix(grads)
        updates, weights = self.directions(grads.new_zeros(1, grads.shape[1]), grads[None])
        return Aggregation(update=updates[0], weights=weights)

    def particle_updates(self, particles: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        """The update d_i of each particle (a d-vector) from its K x d gradient matrix."""
        for g in grads:
            check_gradient_matrix(g)
        updates, _ = self.directions(torch.stack([p.reshape(-1) for p in particles]), torch.stack(list(grads)))
        return list(updates)

    def kernel(self, particles: Tensor) -> tuple[Tensor, float]:
        """(M x M matrix κ(θ_i, θ_j), bandwidth h) for particles given as an M x d matrix."""
        squared = torch.cdist(particles, particles).square()
        h = self.bandwidth
        if h is None:
            # quantile averages the two middle entries (numpy's median, as the authors use);
            # torch.median takes the lower one, a zero diagonal entry when M = 2.
            median = float(squared.flatten().quantile(0.5)) if len(particles) > 1 else 0.0
            h = median / math.log(len(particles) + 1) if median > 0 and math.isfinite(median) else 1.0
        return torch.exp(-squared / h), h

    def directions(self, particles: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """(M x d updates d_i, K weights w) for M x d particles and M x K x d gradients."""
        m = len(particles)
        work = torch.float64 if grads.dtype != torch.float64 else grads.dtype
        theta, g = particles.to(work), grads.to(work)
        kappa, h = self.kernel(theta)
        scale = g.abs().amax().clamp_min(torch.finfo(work).tiny) if g.numel() else 1.0
        unit = torch.nan_to_num(g / scale)  # Q's minimiser is scale-free; keeps huge inputs finite
        q = torch.einsum("ij,ikd,jld->kl", kappa, unit, unit)  # Q_kl
        weights = min_norm_weights(q).to(work)
        combined = torch.einsum("k,jkd->jd", weights, g)  # Σ_k w_k ∇L_k(θ_j)
        driving = kappa @ combined / m  # (1/M) Σ_j κ_ji Σ_k w_k ∇L_k(θ_j)
        # −∇_{θ_j} κ(θ_j, θ_i) = (2/h)(θ_j − θ_i) κ_ji; summed over j (Σ_k w_k = 1, so no w).
        repel = (2.0 / h) * (kappa @ theta - kappa.sum(0)[:, None] * theta) / m
        self.last_weights = weights.to(grads.dtype)
        return (driving + self.repulsion * repel).to(grads.dtype), self.last_weights
