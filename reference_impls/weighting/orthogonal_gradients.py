"""Orthogonal gradients: a penalty that pushes the task gradients of the shared parameters apart.

Suteu & Guo, "Regularizing Deep Multi-Task Networks using Orthogonal Gradients", arXiv:1912.06844
(2019; an ICLR 2020 submission, OpenReview SJeXJANFPr). The paper observes that well-performing
multi-task models keep the angles between task gradients of the shared parameters close to 90°,
and adds a term to the loss that rewards exactly that.

The method in our words. With g_k = ∂L_k/∂θ_shared, the training objective becomes

    L = Σ_k L_k  +  λ Σ_{i<j} cos²(g_i, g_j),     cos(g_i, g_j) = g_i·g_j / (||g_i|| ||g_j||).

The penalty is zero exactly when every pair of task gradients is orthogonal, and it does not care
about the sign of the cosine: aligned gradients are penalised as much as opposed ones, so each
task is pushed to use its own directions of the shared layers. Because the penalty is a function
of gradients, minimising it needs their derivatives: the g_k are computed with
``create_graph=True`` and the penalty is back-propagated through them (double backprop).

Form used here. The paper's text could not be read from this machine (only its abstract), so
neither the equation number nor the normalisation of the sum is checked; we sum the squared
cosine over unordered pairs, which for two tasks is the single term cos²(g_1, g_2). Two
independent re-implementations we looked at use the squared cosine as well, one of them averaged
over pairs (that is our λ divided by K(K−1)/2). A zero gradient has no direction: its cosines
count as 0.

Interface: ``penalty(losses, shared_params)`` returns the differentiable penalty;
``OrthogonalGradients(weight).objective(losses, shared_params)`` returns Σ_k L_k + λ·penalty,
ready for ``.backward()``. It is neither a ``LossWeighting`` (it needs the shared parameters,
not only the losses) nor a ``GradientMethod`` (it changes the loss, not the aggregation), so it
is not in the weighting registry.

Left out: the paper's analysis tools (angle variance statistics) and its experimental models;
the value of λ is the user's (default 1, not the paper's tuned values). A public
re-implementation, Pylon's ``CosRegOptimizer`` (danielmao2019/Pylon), uses the same squared
cosines averaged over pairs with λ = 10, but collects its gradients without keeping their
graph, so in its default mode the penalty passes no gradient back; here it does, as the method
requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.weighting.gradients import flatten


def differentiable_gradients(losses: Tensor, shared_params: Sequence[Tensor]) -> Tensor:
    """K x d matrix of dL_k/dθ that keeps its graph, so functions of it can be differentiated."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared_params, create_graph=True, retain_graph=True, allow_unused=True)
        rows.append(flatten(grads, shared_params))
    return torch.stack(rows)


def cosine_matrix(grads: Tensor) -> Tensor:
    """K x K cosines of the rows; a zero row has cosine 0 with everything (and no NaN gradient).

    Each row is divided by its norm before the products, so rows of 1e-10 or 1e10 behave alike;
    the clamp keeps the square root away from 0, where its derivative is infinite.
    """
    squared_norms = (grads * grads).sum(1, keepdim=True)
    units = grads / squared_norms.clamp_min(torch.finfo(grads.dtype).tiny).sqrt()
    return units @ units.T


def penalty(losses: Sequence[Tensor] | Tensor, shared_params: Sequence[Tensor]) -> Tensor:
    """Σ_{i<j} cos²(∇L_i, ∇L_j) over the shared parameters, differentiable (double backprop)."""
    losses = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
    shared_params = list(shared_params)
    cosines = cosine_matrix(differentiable_gradients(losses, shared_params))
    return torch.triu(cosines, diagonal=1).pow(2).sum()


class OrthogonalGradients:
    """Objective Σ_k L_k + λ Σ_{i<j} cos²(g_i, g_j); call ``objective(...).backward()`` each step."""

    name = "orthogonal_gradients"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)  # λ

    def objective(self, losses: Sequence[Tensor] | Tensor, shared_params: Sequence[Tensor]) -> Tensor:
        losses = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
        if self.weight == 0.0 or len(losses) < 2:
            return losses.sum()  # no pair of tasks: nothing to regularise
        return losses.sum() + self.weight * penalty(losses, shared_params)
