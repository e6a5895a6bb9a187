"""Gradient cosine similarity (GCS): use an auxiliary loss only while it helps the main task.

Du, Czarnecki, Jayakumar, Farajtabar, Pascanu & Lakshminarayanan, "Adapting Auxiliary Losses
Using Gradient Similarity", arXiv:1812.02224, 2018 (an ICLR 2019 submission).

One task is the main task (index 0 by default); the others are auxiliary and only there to
help it. Each auxiliary gradient g_k is gated by its cosine with the main gradient g_0:

    cos_k = g_0 · g_k / (||g_0|| ||g_k||)
    unweighted:  update = g_0 + Σ_{k ≠ 0} 1[cos_k > 0] g_k
    weighted:    update = g_0 + Σ_{k ≠ 0} max(0, cos_k) g_k

Either way every added term has a non-negative inner product with g_0, so
g_0 · update >= ||g_0||²: to first order the main loss falls at least as fast as with its own
gradient alone. That is why the paper can prove convergence to critical points of the main
loss whatever the auxiliary losses are. With every cosine positive the unweighted update is
the plain sum of the task gradients; with every cosine negative it is g_0 alone.

The cosines only need the Gramian, so this is a ``GramianWeighting``; a zero main or
auxiliary gradient has no direction and its cosine is taken as 0 (the auxiliary term is
dropped). Equation and algorithm numbers are not cited: no copy of the paper's text was at
hand to check them. The abstract states the idea (the cosine between the task gradients as
an adaptive weight for the auxiliary loss); the two gates above are the paper's unweighted
and weighted variants as public re-implementations (e.g. AuxiLearn's ``GradCosine``) read it
(``> 0``; a TensorFlow port of the paper's algorithm keeps a gradient at a cosine of exactly 0).

Left out: the paper's reinforcement-learning uses (gating Q-learning or policy-gradient
updates, which are not gradients of a loss) and its per-layer variant; the gate here acts
on the whole vector of shared parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GramianWeighting, check_gradient_matrix
from reference_impls.weighting.gradients import solver_dtype


class GCS(GramianWeighting):
    """Main gradient plus the auxiliary gradients that agree with it (``weighted``: by cosine)."""

    name = "gcs"

    def __init__(self, weighted: bool = False, main_task: int = 0) -> None:
        self.weighted = weighted
        self.main_task = main_task

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        return super().__call__(grads)

    def cosines(self, gramian: Tensor) -> Tensor:
        """cos(g_main, g_k) for every k, 0 where either gradient is zero."""
        gram = gramian.to(solver_dtype(gramian.device))
        norms = gram.diagonal().clamp_min(0).sqrt()
        scale = norms[self.main_task] * norms
        return torch.where(scale > 0, gram[self.main_task] / scale.clamp_min(1e-300), 0.0).clamp(-1, 1)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        if not 0 <= self.main_task < len(gramian):
            raise ValueError(f"main_task {self.main_task} out of range for {len(gramian)} tasks")
        cosines = self.cosines(gramian)
        gates = cosines.clamp_min(0) if self.weighted else (cosines > 0).to(cosines.dtype)
        gates[self.main_task] = 1.0  # the main gradient always counts in full
        return gates.to(gramian.dtype)
