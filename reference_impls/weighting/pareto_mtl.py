"""Pareto MTL: one constrained multi-objective subproblem per preference vector.

Lin, Zhen, Li, Zhang & Kwong, "Pareto Multi-Task Learning", NeurIPS 2019, arXiv:1912.12854.
Equation numbers below are those of that paper: of its NeurIPS 2019 text with the supplement,
ParetoMTL_NeurIPS2019_Full.pdf of Xi-L/ParetoMTL (commit 0407f35); all cited numbers match it.

To get a spread of trade-offs, unit preference vectors u_1..u_P in the positive orthant split
the loss space into sectors; the run that follows u_k only accepts loss vectors L whose
angle to u_k is the smallest (Eq. 6), i.e. it solves (Eq. 5, 7)

    min_θ L(θ)   subject to   G_j(θ) = (u_j − u_k)ᵀ L(θ) <= 0   for every j.

Two phases, each an MGDA-style min-norm problem (Eq. 3 generalised):

1. Initial search (Eq. 9): while some constraint is violated (G_j > 0), step along the
   min-norm point of the convex hull of the violated constraints' gradients
   ∇G_j = Σ_i (u_ji − u_ki) ∇L_i (Eq. 17), which lowers all of them at once. It stops at the
   first feasible point, or after ``max_init_steps``. The set I(θ_r) that Eq. (9) uses is
   printed as {j : G_j >= 0}; read literally it holds j = k (G_k = 0, zero gradient), which
   would make the direction zero, so we take only G_j > 0, as the authors' code does.
2. Constrained descent (Eq. 10, 11): with the ε-active set I_ε = {j : G_j >= −ε}, the
   direction is the min-norm point of the hull of {∇L_i} ∪ {∇G_j : j ∈ I_ε}. The dual
   (Eq. 13, 14) gives multipliers λ_i, β_j >= 0 summing to 1, and the update is
   Σ_i λ_i ∇L_i + Σ_j β_j ∇G_j = Σ_i α_i ∇L_i with α_i = λ_i + Σ_j β_j (u_ji − u_ki)
   (Eq. 18). With no active constraint this is exactly MGDA (Eq. 15, 16).

The minimum-norm point d of a hull satisfies v · d >= ||d||² for every vector v of the hull,
so −d decreases every loss and every active constraint at once (Lemma 2) unless d = 0.
The vectors are linear in the task gradients, so all the work is on the K x K Gramian M: the
hull's Gramian is R M Rᵀ for the coefficient rows R, solved exactly by
``gradients.min_norm_weights``. α is returned as the weights; it may have negative entries
(the run climbs a loss to get back into its sector). The constraint j = k (u_k − u_k = 0) and
copies of u_k are dropped: they are identically zero and would make every direction zero.
Feasibility is tested on L / ||L||, as in the authors' code, so ε is relative to the size of
the losses; preference vectors are scaled to unit length, as the paper assumes.

Interface: the constraints depend on the losses, so the method needs them with the gradients.
Call ``method(grads, losses)``, or, with ``gradients.gradient_step``, call
``method.observe(losses)`` first: the next call uses (and then forgets) those losses. The
object keeps its phase; use one object per run.

Left out: the authors' rescaling of α so that Σ|α_i| = K (a step-size choice; after it their
weights and ours agreed within 1e-6 in the audit), their training schedule (an initial search
of up to 2 epochs, 100 steps here), and solving the P subproblems (one per preference vector)
in parallel: run one object per preference index for that. Their active set has no ε and takes
only strictly violated constraints (G_j > 0); ours is the paper's (G_j >= -ε). Their min-norm
solver is approximate (250 iterations, two-vector answers clamped to 0.999 / 0.001), and they
compute the weights from the gradients of all parameters, task heads included
(Xi-L/ParetoMTL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference_impls.checks import require_non_negative
from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import min_norm_weights, solver_dtype


def two_task_preferences(count: int) -> Tensor:
    """The paper's evenly spread unit vectors for 2 tasks: (cos(jπ/2(n−1)), sin(jπ/2(n−1)))."""
    if count < 2:
        raise ValueError("need at least two preference vectors")
    angles = torch.arange(count, dtype=torch.float64) * (math.pi / 2 / (count - 1))
    return torch.stack([angles.cos(), angles.sin()], dim=1)


class ParetoMTL(GradientMethod):
    """Min-norm direction of the losses and the active sector constraints of preference ``index``."""

    name = "pareto_mtl"
    training_hook = "observe"  # the current losses, before each call

    def __init__(self, preferences: Tensor, index: int, epsilon: float = 0.0, max_init_steps: int = 100) -> None:
        preferences = torch.as_tensor(preferences, dtype=torch.float64)
        if preferences.ndim != 2 or not 0 <= index < len(preferences):
            raise ValueError("preferences must be a P x K matrix and index one of its rows")
        if (preferences < 0).any() or (preferences.norm(dim=1) == 0).any():
            raise ValueError("preference vectors must be non-negative and non-zero")
        self.preferences = preferences / preferences.norm(dim=1, keepdim=True)
        self.index = index
        self.epsilon = epsilon
        require_non_negative(max_init_steps=max_init_steps)
        self.max_init_steps = max_init_steps
        self.initial_steps = 0
        self.searching_initial = True  # phase 1 until the first feasible point
        self.pending_losses: Tensor | None = None
        self.last_multipliers: Tensor | None = None  # (λ, β) of the last min-norm problem

    def observe(self, losses: Tensor) -> None:
        """Record the current losses for the next call (the ``gradient_step`` route)."""
        self.pending_losses = losses.detach().reshape(-1)

    def constraint_values(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(rows u_j − u_k of the non-trivial constraints, their G_j at L / ||L||)."""
        offsets = self.preferences - self.preferences[self.index]
        offsets = offsets[offsets.abs().amax(dim=1) > 0]
        losses = losses.to(offsets)
        norm = losses.norm()
        return offsets, offsets @ (losses / norm if norm > 0 else losses)

    def __call__(self, grads: Tensor, losses: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        losses = self._take_losses(losses, len(grads))
        offsets, values = self.constraint_values(losses)
        if self.searching_initial:
            violated = values > 0
            if violated.any() and self.initial_steps < self.max_init_steps:
                self.initial_steps += 1
                return self._min_norm_direction(grads, offsets[violated])  # Eq. (9)
            self.searching_initial = False
        active = offsets[values >= -self.epsilon]  # I_ε, Eq. (11)
        identity = torch.eye(len(grads), dtype=offsets.dtype)
        return self._min_norm_direction(grads, torch.cat([identity, active]))  # Eq. (10), (14)

    def _take_losses(self, losses: Tensor | None, num_tasks: int) -> Tensor:
        if losses is None:
            losses, self.pending_losses = self.pending_losses, None
        if losses is None:
            raise ValueError("Pareto MTL needs the losses: call method(grads, losses) or observe(losses) first")
        losses = losses.detach().reshape(-1)
        if len(losses) != num_tasks or self.preferences.shape[1] != num_tasks:
            raise ValueError(f"{num_tasks} gradients, {len(losses)} losses, {self.preferences.shape[1]}-d preferences")
        return losses

    def _min_norm_direction(self, grads: Tensor, rows: Tensor) -> Aggregation:
        """Min-norm point of the hull of the vectors rows_r · G (row r: coefficients on the tasks)."""
        gram = (grads @ grads.T).to(solver_dtype(grads.device))
        rows = rows.to(gram)
        self.last_multipliers = min_norm_weights(rows @ gram @ rows.T)
        weights = (self.last_multipliers @ rows).to(grads.dtype)  # α, Eq. (18)
        return Aggregation(update=weights @ grads, weights=weights)
