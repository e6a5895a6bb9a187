"""MoDo: stochastic MGDA whose weights move by one projected step on a double-sampled Gramian.

Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023, arXiv:2305.20057 (code:
github.com/heshandevaka/Trade-Off-MOL).

MGDA's weights λ minimise ½ ||Gᵀλ||² over the simplex Δ. With mini-batch gradients, the
product G Gᵀ of one noisy matrix with itself is a biased estimate of the true Gramian (the
noise enters squared). MoDo ("multi-objective gradient with double sampling") instead draws
two independent mini-batches, with task-gradient matrices G₁ and G₂ (K x d), and moves λ by a
single projected gradient step whose Gramian estimate G₁ G₂ᵀ is unbiased:

    λ <- Π_Δ(λ − γ (G₁ G₂ᵀ λ + ρ λ)),        update = G₃ᵀ λ   (θ <- θ − lr · update).

The paper uses a third independent batch for the update G₃; the authors' code reuses the two
samples (it steps along (G₁ + G₂)ᵀ λ; its toy_fast_3sample.py is the three-sample variant). Here the update uses ``update_grads`` when given and the
mean (G₁ + G₂)/2 otherwise. ρ >= 0 is the code's ℓ2 term (ρ = 0: the plain step). With one
sample (G₂ = G₁) the λ-step is exactly one projected-gradient step of MGDA's problem
min_{λ∈Δ} ½ ||G₁ᵀλ||² + ½ρ ||λ||². Equation numbers are not cited: the update was checked
against the authors' code and TorchJD's description, not against the paper's text.

Interface: ``method(grads, second_grads, update_grads)``; or, with
``gradients.gradient_step``, call ``method.observe_second_sample(second_grads)`` first (the next call uses
and then forgets it). Without a second sample the step uses ``grads`` twice (no double
sampling). λ starts at 1/K and is kept on the object; one object per run. Weights lie on Δ.

Left out: the step-size schedules of the analysis (γ_t, α_t), the authors' optional gradient
normalisation, and the data loading that draws the independent batches.
The default ρ = 0 (the plain step) is ours; the authors' code documents ρ = 0.1 as its default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import project_onto_simplex, solver_dtype


class MoDo(GradientMethod):
    """Projected λ-step on G₁G₂ᵀ, then the update G₃ᵀλ; defaults γ = 0.1, ρ = 0."""

    name = "modo"
    training_hook = "observe_second_sample"  # an independent second mini-batch

    def __init__(self, gamma: float = 0.1, rho: float = 0.0) -> None:
        if gamma <= 0 or rho < 0:
            raise ValueError("need gamma > 0 and rho >= 0")
        self.gamma = gamma
        self.rho = rho
        self.lambd: Tensor | None = None  # λ on the simplex
        self.pending_second: Tensor | None = None

    def observe_second_sample(self, second_grads: Tensor) -> None:
        """Record the second sample's K x d matrix for the next call."""
        self.pending_second = second_grads.detach()

    def __call__(self, grads: Tensor, second_grads: Tensor | None = None,
                 update_grads: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        if second_grads is None:
            second_grads, self.pending_second = self.pending_second, None
        second = grads if second_grads is None else second_grads
        if second.shape != grads.shape:
            raise ValueError(f"samples of shapes {tuple(grads.shape)} and {tuple(second.shape)}")
        lambd = self.step_weights(grads, second)
        if update_grads is None:
            update_grads = grads if second_grads is None else (grads + second) / 2
        check_gradient_matrix(update_grads)
        return Aggregation(update=lambd.to(grads.dtype) @ update_grads, weights=lambd.to(grads.dtype))

    def step_weights(self, first: Tensor, second: Tensor) -> Tensor:
        """One projected step λ <- Π_Δ(λ − γ (G₁G₂ᵀ + ρI) λ), computed in float64."""
        dtype = solver_dtype(first.device)
        k = len(first)
        if self.lambd is None or len(self.lambd) != k:
            self.lambd = torch.full((k,), 1.0 / k, dtype=dtype, device=first.device)
        lambd = self.lambd
        cross = first.to(dtype) @ (second.to(dtype).T @ lambd)  # G₁ G₂ᵀ λ, never forming d x d
        step = lambd - self.gamma * (cross + self.rho * lambd)
        if torch.isfinite(step).all():  # an overflowing step (1e10-sized rows in float32) keeps λ
            self.lambd = project_onto_simplex(step)
        return self.lambd
