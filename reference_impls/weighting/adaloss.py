"""AdaLoss: weights inversely proportional to each loss's running average.

Hu, Dey, Hebert & Bagnell, "Learning Anytime Predictions in Neural Networks via Adaptive
Loss Balancing", AAAI 2019 (33(01), pp. 3812-3821), arXiv:1708.06832.

The paper trains the K auxiliary predictions of an anytime network (an early exit after
each block), whose losses differ by orders of magnitude, and wants each of them to count
regardless of its scale. Minimising the sum of *log* losses does that: its gradient is
Σ_k ∇L_k / L_k, a weighted sum whose weights are the inverse losses, and a loss times a
constant only shifts its log. (The paper motivates the same objective as the geometric
mean of the expected losses.) Per-batch losses are noisy, so the inverse is taken of a
running average instead:

    L̂_k ← m · L̂_k + (1 − m) · L_k          (exponential average, momentum m)
    w_k  ∝ 1 / L̂_k,  scaled so that max_k w_k = 1,
    w_k  ← (1 − γ) · w_k + γ                 (mix with constant weights)

As in the authors' code (``AdaptiveLossWeight`` in AnytimeNeuralNetwork at f2f04a8;
momentum 0.9 and γ = 0.07 are its training script's defaults, the class's own are 0.3 and
0.99; it adds its small constant after inverting, 1/L̂ + 1e-8, where the average is floored
here; agreement to 4e-10 in the audit), the weights used at step t come from the averages of steps
< t, the first step uses weight 1, and the mix with constant weights keeps every task
from being switched off. γ = 0 and m = 0 give exactly the gradient of Σ_k log L_k at
the previous step's losses, times min_k L_k. The paper's equation numbers were not
checked (no copy of its body was at hand).

Interface: call ``weights(losses)`` or ``combine(losses)`` once per step; losses should be
positive (the average is floored at ``eps``).

Left out: the anytime-network specifics: the extra weight the authors' code gives the final
prediction (``final_extra``) and the exponentially deepening ensemble (EANN). The refresh
schedule is simplified: the authors' code keeps the weights at 1 for the first 100 steps
and then recomputes them from the running average only every 100 steps
(``adaloss_update_per``), where this file recomputes them at every step. Also left out:
its optional first-order variant, which averages per-prediction squared gradient norms
instead of losses (``adaloss_order=1``, off by default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class AdaLoss(LossWeighting):
    """1 / (running mean of L_k), max-normalised, mixed with uniform weights by γ."""

    name = "adaloss"

    def __init__(self, momentum: float = 0.9, uniform_mix: float = 0.07, eps: float = 1e-8) -> None:
        super().__init__()
        if not (0 <= momentum < 1 and 0 <= uniform_mix <= 1):
            raise ValueError("need 0 <= momentum < 1 and 0 <= uniform_mix <= 1")
        self.momentum = momentum
        self.uniform_mix = uniform_mix
        self.eps = eps
        self.register_buffer("average", torch.empty(0))  # L̂_k; empty until the first losses

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        losses = losses.detach()
        weights = torch.ones_like(losses) if self.average.numel() == 0 else self.inverse_weights(self.average.to(losses))
        self.record(losses)
        return weights

    def inverse_weights(self, average: Tensor) -> Tensor:
        """w ∝ 1 / L̂ with max 1, then mixed with constant weights: (1 − γ) w + γ."""
        inverse = 1.0 / average.clamp_min(self.eps)
        return (1 - self.uniform_mix) * inverse / inverse.max() + self.uniform_mix

    def record(self, losses: Tensor) -> None:
        """Update the exponential average (the first losses start it)."""
        if self.average.numel() == 0:
            self.average = losses.clone()
        else:
            self.average = self.momentum * self.average.to(losses) + (1 - self.momentum) * losses
