"""BayesAgg-MTL: per-coordinate precision-weighted aggregation of uncertain task gradients.

Achituve, Diamant, Netzer, Chechik, Fetaya, "Bayesian Uncertainty for Gradient Aggregation
in Multi-Task Learning", ICML 2024, arXiv:2402.04005.

Each task's last layer gets a Gaussian posterior w ~ N(μ, Σ) instead of a point estimate.
The gradient of the task loss with respect to the shared representation h then becomes a
random vector, and its mean and variance say how sure we are about each coordinate. The
tasks are combined coordinate by coordinate, trusting each task in proportion to its
precision (as a product of Gaussians would):

    d_j = Σ_k (m_kj / v_kj) / Σ_k (1 / v_kj),     m = E[g], v = Var[g].

Regression heads have everything in closed form (this file). With loss (y − wᵀh)²,
g = ∂L/∂h = 2 (wᵀh − y) w. Writing u = wᵀh − y, the pair (u, w_j) is jointly Gaussian with
means a = μᵀh − y, b = μ_j, variances p = hᵀΣh, q = Σ_jj and covariance c = (Σh)_j, so

    E[g_j]   = 2 (a b + c)
    Var[g_j] = 4 (a² q + b² p + p q + c² + 2 a b c)      (Isserlis / Gaussian 4th moments)

The mean matches the authors' ``ExactMoments`` (2((Σ + μμᵀ)h − yμ)); they too keep only the
diagonal of the gradient covariance. The posterior of a linear regression head with a
N(0, γ I) prior on [w, b] and unit noise is the usual conjugate one (``posterior``).

Contract: ``BayesAggMTL`` is a ``GradientMethod``. Called on a K x d matrix alone it treats
every row as equally certain and returns the row mean (the limit of equal variances);
``aggregate(means, variances)`` is the method proper, and ``regression_moments`` makes
the (means, variances) of one regression task for one sample. Per-sample directions are
averaged over the batch into one d-vector; the authors instead keep one direction per
sample, scale it by 1/B and back-propagate each through its own row of h (the same sum
over the batch, but per-sample rows reach the encoder).

Left out: the classification heads (the paper's Taylor / Monte-Carlo approximation of the
moments), the authors' use of a full-training-set posterior as the prior of each batch's
posterior, their optional power on the variance, and the back-propagation of d through
the shared encoder (the caller does ``h.backward`` with the per-sample rows). The authors'
regression posterior and closed-form moments cover the weights only (no bias in u); here
the head is [w, b] and the bias shifts u. Equation numbers were not checked.

Checked against ssi-research/BayesAgg_MTL, BayesAgg_MTL/BayesAggMTL.py (``GaussianAgg``,
``ExactMoments``, ``LastLayerPosteriorRegression``) and experiments/utkface/trainer.py: for a
head without bias our moments and aggregation agree with theirs to float64 rounding. Also
different: our prior variance defaults to 1, theirs to γ = 0.001 (0.005 in their UTKFace run);
a regression task with several outputs is one row per output there, one task is one output here;
the heads themselves get the plain gradient of the summed losses there, which is the caller's job here.
Their UTKFace run uses the variance power (0.3 for regression, 0.1 for classification; this file
is the power-1 case), first trains 10 epochs on the plain summed loss, and clips gradients
(heads at 10, shared parameters at 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class BayesAggMTL(GradientMethod):
    """Precision-weighted per-coordinate mean of task-gradient means."""

    name = "bayesagg_mtl"

    def __init__(self, min_variance: float = 1e-8) -> None:
        self.min_variance = min_variance

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        return self.aggregate(grads, torch.ones_like(grads))

    def aggregate(self, means: Tensor, variances: Tensor) -> Aggregation:
        """``means`` and ``variances``: K x d (or B x K x d, averaged over B afterwards)."""
        precision = 1.0 / variances.clamp_min(self.min_variance)
        share = precision / precision.sum(dim=-2, keepdim=True)  # per-coordinate task shares
        update = (share * means).sum(dim=-2)
        if update.ndim == 2:  # per-sample directions: mean over the batch
            update, share = update.mean(0), share.mean(0)
        return Aggregation(update=update, weights=share.mean(-1))


def posterior(features: Tensor, targets: Tensor, prior_variance: float = 1.0) -> tuple[Tensor, Tensor]:
    """Conjugate posterior N(mean, cov) of [w, b] for y = wᵀh + b + N(0, 1), prior N(0, γ I)."""
    design = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    precision = design.T @ design + torch.eye(design.shape[1], dtype=design.dtype, device=design.device) / prior_variance
    cov = torch.linalg.inv(precision)
    return cov @ design.T @ targets, cov


def regression_moments(h: Tensor, y: Tensor, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """E[g] and the diagonal of Var[g] for g = ∂(y − wᵀh − b)²/∂h, [w, b] ~ N(mean, cov).

    ``h``: B x d, ``y``: B; returns two B x d tensors. The bias only shifts u.
    """
    d = h.shape[1]
    hb = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)  # [h, 1] picks up the bias
    a = hb @ mean - y                                  # E[u]
    p = torch.einsum("bi,ij,bj->b", hb, cov, hb)       # Var[u]
    c = (hb @ cov)[:, :d]                              # Cov(u, w_j)
    b, q = mean[:d], torch.diagonal(cov)[:d]           # E[w_j], Var[w_j]
    a, p = a[:, None], p[:, None]
    expected = 2 * (a * b + c)
    variance = 4 * (a**2 * q + b**2 * p + p * q + c**2 + 2 * a * b * c)
    return expected, variance
