"""OL-AUX: auxiliary-task weights learned online from gradient alignment with the main task.

Lin, Baweja, Kantor & Held, "Adaptive Auxiliary Task Weighting for Reinforcement Learning",
NeurIPS 2019 (pp. 4772-4783; no arXiv id found).

Task 0 is the main task, tasks 1..K-1 are auxiliary. The network follows
g = ∇L_0 + Σ_k w_k ∇L_k, and an auxiliary task is worth its weight only if following its
gradient lowers the *main* loss. OL-AUX treats the weights as parameters of that inner
descent and moves them by the gradient of the main loss after the network's step(s): one
SGD step θ' = θ − α g gives, with the chain rule,

    ∂L_0(θ') / ∂w_k = −α ∇L_0(θ')ᵀ ∇L_k(θ) ≈ −α ∇L_0(θ)ᵀ ∇L_k(θ),

so the weight update is w_k ← w_k + β α ∇L_0ᵀ ∇L_k: an auxiliary task whose gradient agrees
with the main task's gains weight, one that conflicts with it loses weight. Over a horizon of
N network steps the N-step version sums these inner products along the trajectory and updates the
weights once every N steps:

    w_k ← w_k + β α Σ_{j=0}^{N-1} ∇L_0(θ_{t+j})ᵀ ∇L_k(θ_{t+j}).

Here ``weight_lr`` stands for the product β·α (the weights' step size times the network's
learning rate). ``horizon`` is N; N = 1 (the default) updates after every step. The update
of step t uses the weights held before it, then accumulates that step's inner products. The
main task's weight stays 1. The paper's equation numbers were not checked (its body was not
at hand): the rule above is derived from the paper's stated idea (auxiliary gradients should
help decrease the main loss) by the chain rule: inner products of main and auxiliary
gradients, summed over N steps, then one SGD step on the weights.

Interface: a ``GradientMethod`` that keeps state: call it once per step with the K x d
matrix (row 0 the main task). Weights may become negative unless ``nonnegative=True``.
``weight_lr`` = 1e-3 is our default, not the paper's.

The authors' released code (github.com/Xingyu-Lin/auxiliary-tasks-rl at 0146d2e, a
re-implementation by one of them, the original being lost) differs from this first-order
sum in both of its versions: its DDPG code takes the "main" gradient of the whole weighted
critic loss, auxiliary terms included, and its quadratic demo multiplies each inner product
by the task's weight, with no learning-rate factor (the two agree with ours to 4e-16 once
that factor is removed). Its DDPG code scales the inner products by the network's learning
rate, averages them over N = 5 steps and multiplies by 5·N (β = 5), log-transforms the main
loss too, steps the weights with Adam at 5e-3 and clips them at 0 after every update
(``nonnegative=True`` here).

Left out: the reinforcement-learning setting (RL main objective, self-supervised auxiliary
losses, replay data); two options on by default in the released code, auxiliary losses
taken as log(L_k + 0.02) and gradients averaged over the last 4 steps before the inner
products. The N-step version is reduced: for N > 1 we sum the first-order inner
products at the N steps actually taken and drop the second-order (Hessian) terms that the
exact chain rule through N updates would add.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import solver_dtype


class OLAux(GradientMethod):
    """Main task weight 1; auxiliary weights follow β α Σ ∇L_0ᵀ ∇L_k every N steps."""

    name = "ol_aux"

    def __init__(self, weight_lr: float = 1e-3, horizon: int = 1, initial_weight: float = 1.0,
                 nonnegative: bool = False) -> None:
        if horizon < 1:
            raise ValueError(f"horizon N must be >= 1, got {horizon}")
        self.weight_lr = weight_lr
        self.horizon = horizon
        self.initial_weight = initial_weight
        self.nonnegative = nonnegative
        self.aux_weights: Tensor | None = None  # w_1..w_{K-1}
        self.alignment: Tensor | None = None  # Σ_j ∇L_0ᵀ ∇L_k over the current horizon
        self.steps_in_horizon = 0

    def weights(self, num_tasks: int, like: Tensor) -> Tensor:
        """Current weights (1, w_1, ..., w_{K-1}) in ``like``'s dtype and device."""
        if self.aux_weights is None:
            dtype = solver_dtype(like.device)  # float64 where the device has it: weights sum many products
            self.aux_weights = torch.full((num_tasks - 1,), self.initial_weight, dtype=dtype, device=like.device)
            self.alignment = torch.zeros_like(self.aux_weights)
        elif len(self.aux_weights) != num_tasks - 1:
            raise ValueError(f"expected {len(self.aux_weights) + 1} tasks, got {num_tasks}")
        return torch.cat([self.aux_weights.new_ones(1), self.aux_weights]).to(like.dtype)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        weights = self.weights(len(grads), grads)
        update = weights @ grads
        rows = grads.detach().to(self.aux_weights.dtype)
        self.alignment += rows[1:] @ rows[0]  # ∇L_0ᵀ ∇L_k for each auxiliary task
        self.steps_in_horizon += 1
        if self.steps_in_horizon == self.horizon:
            self.aux_weights = self.aux_weights + self.weight_lr * self.alignment  # w_k += β α Σ_j ∇L_0ᵀ ∇L_k
            if self.nonnegative:
                self.aux_weights = self.aux_weights.clamp_min(0.0)
            self.alignment = torch.zeros_like(self.alignment)
            self.steps_in_horizon = 0
        return Aggregation(update=update, weights=weights)
