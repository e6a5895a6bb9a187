"""FS-MTL: per-task sharpness-aware gradients, split into a loss part and a flatness part.

Phan, Tran, Tran, Tran, Truong, Lei, Ho, Phung & Le, "Beyond Losses Reweighting: Empowering
Multi-Task Learning via the Generalization Perspective", ICCV 2025, arXiv:2211.13723 (first
titled "Improving Multi-task Learning via Seeking Task-based Flat Regions"; code:
github.com/VietHoang1512/FS-MTL).

Gradient methods for MTL only look at the training losses; FS-MTL asks the shared parameters to
sit in a region that is flat for every task, as sharpness-aware minimisation (SAM) does for one
loss. Each task k gets its own worst-case perturbation of the shared parameters,

    ε_k = ρ g_k / ||g_k||,        g_k^SAM = ∇L_k(θ + ε_k),

and its SAM gradient is split into the ordinary gradient g_k, which lowers the loss, and the
rest h_k = g_k^SAM − g_k, which (to first order, ρ H_k g_k/||g_k||) lowers the sharpness. The
two families would conflict differently, so each is aggregated on its own by any gradient
method, and the update is their sum:

    update = Agg(g_1, ..., g_K) + Agg(h_1, ..., h_K).

With a linear aggregator (equal weighting) this is just the sum of the per-task SAM gradients;
with ρ = 0 it is the aggregator alone. ``adaptive=True`` uses the adaptive-SAM perturbation
(ε_k = ρ θ² ⊙ g_k / ||θ ⊙ g_k||), which the authors' code enables by default; here it is off
unless asked for (the plain SAM perturbation of the rule above). The default radius
ρ = 0.05 is ours, the radius most used with plain SAM (e.g. the ``rho=0.05, adaptive=False``
defaults of the widely copied PyTorch SAM optimizer, and of the authors' multi-mnist/train.py);
their NYUv2 script instead uses ρ = 2 with adaptive SAM (``nyuv2/train.py``: ``--rho`` 2,
``--adaptive`` True), a radius meant for the parameter-scaled perturbation (pinned by a test). Equation numbers
are not cited: the rule above was checked against the authors' code, not the paper's text.

Interface: ``method(grads, perturbed_grads)`` with both K x d matrices (row k of the second at
θ + ε_k), or ``method.observe_sam_gradients(perturbed_grads)`` before ``gradients.gradient_step`` on losses
from a fresh forward pass (the perturbations shift the parameters in place, which invalidates
the graph of losses computed before them; ``reference_impls.train`` does exactly this).
``method.sam_gradients(losses_fn, params, grads)`` (``perturbed_task_gradients`` with the
object's ρ and ``adaptive``) computes them for a model: K extra forward/backward passes.

Left out: the SAM step for the task-specific heads (each head is perturbed along its own
gradient in the authors' code, also while task k's shared SAM gradient is computed, which
moved the flatness part h_k by about its own norm in the audit's comparison; here heads are
not perturbed and get their ordinary gradient), the authors'
rescaling of g and h to unit norm (and of the result by K) when the aggregator is MGDA,
the authors' freezing of batch-norm running statistics during the K perturbed passes (here
``losses_fn`` runs in whatever mode the model is in), and the generalisation bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.ew_grad import EqualWeightingGradient
from reference_impls.weighting.gradients import flatten


def task_perturbations(grads: Tensor, rho: float, params: Tensor | None = None) -> Tensor:
    """Row k: ε_k = ρ g_k/||g_k|| (or adaptive, given the flat parameters θ); zero rows stay zero."""
    if params is None:
        norms = grads.norm(dim=1, keepdim=True)
        return torch.where(norms > 0, rho * grads / norms.clamp_min(1e-300), torch.zeros_like(grads))
    scaled = params.abs() * grads  # |θ| ⊙ g_k
    norms = scaled.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, rho * params.abs() * scaled / norms.clamp_min(1e-300), torch.zeros_like(grads))


@torch.no_grad()
def _shift(params: Sequence[Tensor], originals: Sequence[Tensor], vector: Tensor) -> None:
    """Set every parameter to its original value plus its slice of ``vector``."""
    offset = 0
    for p, original in zip(params, originals):
        p.copy_(original + vector[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()


def perturbed_task_gradients(losses_fn: Callable[[], Tensor], params: Sequence[Tensor], grads: Tensor,
                             rho: float, adaptive: bool = False) -> Tensor:
    """Row k: ∇L_k at θ + ε_k, for the shared ``params``; the parameters are restored exactly."""
    params = list(params)
    originals = [p.detach().clone() for p in params]
    flat = torch.cat([p.reshape(-1) for p in originals]).to(grads) if adaptive else None
    rows = []
    try:
        for k, epsilon in enumerate(task_perturbations(grads, rho, flat)):
            _shift(params, originals, epsilon)
            loss = losses_fn().reshape(-1)[k]
            rows.append(flatten(torch.autograd.grad(loss, params, allow_unused=True), params))
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
    return torch.stack(rows).to(grads)


class FlatSeekingMTL(GradientMethod):
    """Agg(loss gradients) + Agg(flatness gradients g_k^SAM − g_k), any aggregator."""

    name = "fs_mtl"
    training_hook = "observe_sam_gradients"

    def __init__(self, aggregator: GradientMethod | None = None, rho: float = 0.05, adaptive: bool = False) -> None:
        if rho < 0:
            raise ValueError("rho must be non-negative")
        self.aggregator = EqualWeightingGradient() if aggregator is None else aggregator
        self.rho, self.adaptive = rho, adaptive
        self.pending_perturbed: Tensor | None = None

    def sam_gradients(self, losses_fn: Callable[[], Tensor], params: Sequence[Tensor], grads: Tensor) -> Tensor:
        """``perturbed_task_gradients`` with this object's ρ and adaptive setting."""
        return perturbed_task_gradients(losses_fn, params, grads, self.rho, self.adaptive)

    def observe_sam_gradients(self, perturbed_grads: Tensor) -> None:
        """Record the SAM gradients (K x d) for the next call."""
        self.pending_perturbed = perturbed_grads.detach()

    def __call__(self, grads: Tensor, perturbed_grads: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        if perturbed_grads is None:
            perturbed_grads, self.pending_perturbed = self.pending_perturbed, None
        if perturbed_grads is None:
            raise ValueError("FS-MTL needs the per-task SAM gradients: method(grads, perturbed) or observe_sam_gradients()")
        if perturbed_grads.shape != grads.shape:
            raise ValueError(f"shapes {tuple(grads.shape)} and {tuple(perturbed_grads.shape)} differ")
        loss_part = self.aggregator(grads).update
        flat_part = self.aggregator(perturbed_grads.to(grads) - grads).update
        return Aggregation(update=loss_part + flat_part, weights=None)
