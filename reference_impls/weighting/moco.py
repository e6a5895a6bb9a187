"""MoCo: stochastic MGDA with tracked gradients and a slowly moving weight vector.

Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
Stochastic Approach", ICLR 2023, arXiv:2210.12624, Algorithm 1. With stochastic gradients the
MGDA weights computed from one mini-batch are biased. MoCo keeps a tracking estimate Y of
the K task gradients and moves the weights λ by one projected gradient step per iteration:

    Y <- Y − β_t (Y − G_t)                                  (track the gradients)
    λ <- Π_simplex(λ − γ_t (Y Yᵀ + ρ I) λ)                   (one step on ½ λᵀ(YYᵀ + ρI)λ)
    update = Yᵀ λ

with step sizes β_t = β / t^σ_β and γ_t = γ / t^σ_γ at step t = 1, 2, ... Y starts at zero
and λ at 1/K. The authors also optionally project each tracked row onto a bounded set and
rescale gradients by the losses; neither is done here. Their released code
(heshandevaka/MoCo at 88ec9e2, checked) departs from Algorithm 1 as written above: the
Cityscapes script (CAGrad/utils.py) replaces the simplex projection by a softmax of the
stepped λ, decays β_t, γ_t per epoch and multiplies the update by K; the NYUv2 folder's
tracking function projects, as here, with per-epoch decay, but its trainer never calls it
at that commit; the Office runs project but take the step on λᵀYYᵀλ (twice the step
here). This file follows the algorithm. The defaults below are ours: the code's argument
defaults have β = 0.1, and its run scripts use 0.05 (Cityscapes) and 0.99 without decay
(NYUv2).

Convention: λ lies on the simplex (MGDA's convex-combination scaling). The update combines
the *tracked* rows, not the rows passed in, so ``weights`` is None; λ is in ``self.lambd``.
Stateful: one object per training run; the gradient dimension is fixed by the first call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import project_onto_simplex, solver_dtype


class MoCo(GradientMethod):
    """Tracked-gradient MGDA; defaults β=0.5, σ_β=0.5, γ=0.1, σ_γ=0.5, ρ=0."""

    name = "moco"

    def __init__(self, beta: float = 0.5, beta_decay: float = 0.5, gamma: float = 0.1,
                 gamma_decay: float = 0.5, rho: float = 0.0) -> None:
        self.beta, self.beta_decay = beta, beta_decay
        self.gamma, self.gamma_decay = gamma, gamma_decay
        self.rho = rho
        self.step = 0
        self.tracked: Tensor | None = None  # Y, K x d
        self.lambd: Tensor | None = None    # λ, K

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        if self.tracked is None:
            self.tracked = torch.zeros_like(grads)
            self.lambd = torch.full((len(grads),), 1.0 / len(grads), dtype=solver_dtype(grads.device), device=grads.device)
        if self.tracked.shape != grads.shape:
            raise ValueError(f"MoCo tracks shape {tuple(self.tracked.shape)}, got {tuple(grads.shape)}")
        self.step += 1
        beta_t = self.beta / self.step**self.beta_decay
        gamma_t = self.gamma / self.step**self.gamma_decay
        self.tracked = self.tracked - beta_t * (self.tracked - grads)
        gram = (self.tracked @ self.tracked.T).to(self.lambd)
        gram = gram + self.rho * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        self.lambd = project_onto_simplex(self.lambd - gamma_t * gram @ self.lambd)
        return Aggregation(update=self.lambd.to(grads.dtype) @ self.tracked, weights=None)
