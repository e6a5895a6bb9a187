"""NTKMTL: balance the tasks' convergence speeds through their neural tangent kernels.

Qin, Wang, Liao & Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from
Neural Tangent Kernel Perspective", NeurIPS 2025, arXiv:2510.18258.

Under gradient descent in the NTK regime, task k's residual on a mini-batch of n samples
shrinks along the eigenvectors of its kernel K_k = J_k J_kᵀ (J_k: the n x d Jacobian of the
per-sample losses w.r.t. the shared parameters), fastest along the top eigenvalue λ_k. A task
with a large λ_k dominates training. Weighting task k's loss by w_k scales its kernel by
w_k², so NTKMTL picks

    w_k = (Σ_j λ_j / λ_k)^(1/2)      (``exponent`` = 1/2),

which makes every scaled kernel w_k² K_k have the same top eigenvalue Σ_j λ_j: no task's
dominant mode converges faster than another's. The update is Σ_k w_k ḡ_k with ḡ_k the
batch-mean gradient of task k.

Two forms, from the official code (github.com/jianke0604/NTKMTL; its NYUv2 script uses the
exponent 0.75, and it gives NaN where a task's gradient is zero):

- ``__call__`` on the K x d matrix of task gradients is the n = 1 form the official
  experiments run: the kernel is the scalar ||g_k||², so w_k = (Σ_j ||g_j||² / ||g_k||²)^(1/2)
  and every task contributes a vector of the same norm (Σ_j ||g_j||²)^(1/2);
- ``from_per_sample`` takes the K x n x d per-sample gradients (the mini-batch variant)
  and uses the top eigenvalue of each n x n kernel. Given per-sample gradients of a shared
  representation instead of the parameters it is close to the authors' NTKMTL-SR, which is a
  loss weighting (so the task heads get weighted gradients too) and takes its per-sample
  rows over the whole batch tensor; for n = 1 that is ``gradients.representation_step`` with
  this method. (Which of the paper's algorithms each form is was not checked against its
  text.)

A task whose gradient is exactly zero has no kernel to balance and gets weight 0. Equation
numbers are not cited: we could not read the paper's text, only its abstract and the
official code, from which the rule above is taken.

Left out: the official code multiplies the update by K and clips its norm to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GramianWeighting, check_gradient_matrix
from reference_impls.weighting.gradients import solver_dtype


class NTKMTL(GramianWeighting):
    """w_k = (Σ_j λ_j / λ_k)^exponent from each task's top NTK eigenvalue λ_k."""

    name = "ntkmtl"

    def __init__(self, exponent: float = 0.5) -> None:
        self.exponent = exponent

    def weights_from_eigenvalues(self, eigenvalues: Tensor) -> Tensor:
        """The balancing rule; computed in float64 so 1e-20 next to 1e20 does not overflow."""
        lam = eigenvalues.to(solver_dtype(eigenvalues.device)).clamp_min(0)
        live = lam > 0
        ratio = torch.where(live, lam.sum() / torch.where(live, lam, 1.0), 0.0)
        return torch.where(live, ratio**self.exponent, 0.0)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        # n = 1: task k's kernel is the scalar ||g_k||², the Gramian's diagonal.
        return self.weights_from_eigenvalues(gramian.diagonal()).to(gramian.dtype)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        return super().__call__(grads)

    def from_per_sample(self, per_sample: Tensor) -> Aggregation:
        """Mini-batch form: ``per_sample`` is K x n x d (row j of task k: dℓ_kj/dθ)."""
        if per_sample.ndim != 3:
            raise ValueError(f"expected K x n x d per-sample gradients, got {tuple(per_sample.shape)}")
        wide = per_sample.to(solver_dtype(per_sample.device))
        kernels = wide @ wide.transpose(1, 2)  # K x n x n, one NTK per task
        top = torch.linalg.eigvalsh(kernels)[:, -1]
        weights = self.weights_from_eigenvalues(top).to(per_sample.dtype)
        mean_grads = per_sample.mean(1)
        return Aggregation(update=weights @ mean_grads, weights=weights)
