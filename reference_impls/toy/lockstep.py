"""Optimise many runs of the two-objective toy in lock-step, cheaply.

A toy run is 2-D, so at 100,000 steps the cost is per-step overhead, not arithmetic.
Here every run (one method from one start) advances together: one closed-form call
gives the losses and the 2 x 2 task-gradient matrices of all points, each run's method
turns its matrix into an update, and one tensor expression applies Adam to all points.
The methods themselves are called exactly as in a training loop, one run at a time,
so stateful methods keep their own state.

Adam is torch.optim.Adam's rule with its defaults (betas 0.9 / 0.999, eps 1e-8, no
weight decay), as the CAGrad, Nash-MTL and FAMO toy scripts use it:

    m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
    x ← x - (lr / (1 - β1ᵗ)) · m / (√v / √(1 - β2ᵗ) + eps)

Runs marked ``plain_sgd`` (a method that already returns an Adam-like step, MTAdam)
take x ← x - lr · g instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reference_impls.toy import two_objective as toy

# direction(losses (2,), jacobian (2 x 2), step) -> update (2,), fed to the optimiser as a gradient
Direction = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class BatchedAdam:
    """Adam on an R x 2 tensor of points, one independent optimiser per row."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_count: int = 0
    first_moment: Tensor | None = None
    second_moment: Tensor | None = None

    def step(self, x: Tensor, grad: Tensor) -> Tensor:
        """Return the new points (x is not modified)."""
        beta1, beta2 = self.betas
        if self.first_moment is None:
            self.first_moment, self.second_moment = torch.zeros_like(x), torch.zeros_like(x)
        self.step_count += 1
        self.first_moment = beta1 * self.first_moment + (1 - beta1) * grad
        self.second_moment = beta2 * self.second_moment + (1 - beta2) * grad * grad
        step_size = self.lr / (1 - beta1**self.step_count)
        denominator = self.second_moment.sqrt() / math.sqrt(1 - beta2**self.step_count) + self.eps
        return x - step_size * self.first_moment / denominator


@dataclass
class Trajectories:
    """What ``simulate`` returns: recorded points and, per run, the first non-finite step."""

    steps: Tensor  # T, the step index of each record (0, every, 2·every, ..., and the last)
    points: Tensor  # T x R x 2
    diverged_at: list[int | None]


def simulate(
    directions: Sequence[Direction],
    starts: Sequence[tuple[float, float]],
    steps: int,
    lr: float = 1e-3,
    first_scale: float = 1.0,
    plain_sgd: Sequence[bool] | None = None,
    record_every: int = 100,
    dtype: torch.dtype = torch.float64,
) -> Trajectories:
    """Run ``directions[r]`` from ``starts[r]`` for ``steps`` optimiser steps, all at once.

    ``dtype`` is that of the points, losses, gradients and Adam state (the papers' scripts
    use float32; float64 is the default here)."""
    x = torch.tensor(starts, dtype=dtype)
    sgd_rows = torch.tensor(plain_sgd or [False] * len(starts))[:, None]
    adam = BatchedAdam(lr)
    alive = [True] * len(starts)
    diverged_at: list[int | None] = [None] * len(starts)
    still = torch.zeros(2, dtype=x.dtype)
    recorded_steps, recorded_points = [], []
    for step in range(steps):
        if step % record_every == 0:
            recorded_steps.append(step)
            recorded_points.append(x.clone())
        values, jacobians = toy.losses_and_jacobian(x, first_scale)
        updates = torch.stack([
            direction(values[r], jacobians[r], step) if alive[r] else still
            for r, direction in enumerate(directions)
        ]).to(x)
        x = torch.where(sgd_rows, x - lr * updates, adam.step(x, updates))
        if not bool(torch.isfinite(x).all()):
            for r in (~torch.isfinite(x).all(dim=1)).nonzero().flatten().tolist():
                if alive[r]:
                    alive[r], diverged_at[r] = False, step
    recorded_steps.append(steps)
    recorded_points.append(x.clone())
    return Trajectories(torch.tensor(recorded_steps), torch.stack(recorded_points), diverged_at)
