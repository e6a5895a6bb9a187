"""MC-SGD: merge the old multi-task solution and the new task's solution along two lines.

Mirzadeh, Farajtabar, Görür, Pascanu, Ghasemzadeh, "Linear Mode Connectivity in Multitask
and Continual Learning", ICLR 2021, arXiv:2010.04495.

The paper's finding: when tasks are learned one after another, the solution for tasks
1..t trained jointly (multi-task) is joined to each continual solution by a straight
path of low loss, as long as both started from the same point. Mode Connectivity SGD
(MC-SGD) turns this into a continual-learning rule. Tasks arrive in turn; after task t:

1. plain SGD on task t, started from the previous merged solution w̄_{t-1}, gives the
   continual solution ŵ_t (which forgets the earlier tasks);
2. the new merged solution w̄_t starts at w̄_{t-1} + α (ŵ_t − w̄_{t-1}), a point on the
   segment between the two (α = ``init_position``);
3. w̄_t then moves so that the loss stays low along *both* straight lines that end in it:
   the loss of the earlier tasks (on a small replay memory) along w̄_{t-1} → w̄_t, and the
   loss of task t along ŵ_t → w̄_t. Each line is sampled at N + 1 evenly spaced points
   (s = 0, 1/N, ..., 1; N = ``line_samples``), and the update direction is the sum, over
   both lines and all their points, of the loss gradient at that point;
4. training on task t + 1 starts from w̄_t.

In merging terms, w̄_{t-1} plays the pre-trained weights and ŵ_t − w̄_{t-1} the one task
vector; unlike the data-free rules, MC-SGD needs data (the replay memory and some of task
t's examples), given here as two loss functions of the parameters.

Source of the rule: the paper's own repository (github.com/imirzadeh/MC-SGD) holds only a
README pointing to CodaLab bundles of "an earlier version of the code", which we could not
read. The rule above is from ``cl_gym/algorithms/mcsgd.py`` of CL-Gym
(github.com/imirzadeh/CL-Gym), the continual-learning library of the same first author
(Iman Mirzadeh, every commit; its class cites the paper's OpenReview page):
``find_connected_minima`` starts at ``w_bar_prev + (w_hat_curr - w_bar_prev) * alpha``
(α = 0.25 by default), ``calculate_line_loss`` evaluates the loss at
``w_start + (w_end - w_start) * t`` for t in 0, 0.1, ..., 1 (10 line samples by default) on
the memory of the earlier tasks and on a subset of the current task, and the gradients at
all these points, summed, are the gradient of one SGD-with-momentum step; the next task is
trained from the result. The paper's abstract (read on arXiv-vanity) confirms the aim: the
sequentially learned minimum is constrained to behave like the multi-task one.

Note what the direction is: each point's loss gradient is taken with respect to that point
and summed as it is, without the factor s that the chain rule would put on the gradient of
``Σ_s L(start + s (w − start))`` with respect to w (:meth:`line_loss`, which we provide to
measure, is that sum). We follow the code. Not reproduced: the released loop never clears
the parameters' ``.grad`` between the points (``zero_grad`` runs once, before both lines), so
its later points also add again every earlier gradient, and every point of the current
task's line adds the whole memory line's gradient once more, so its direction is dominated
by the memory loss; we sum each point's gradient once. It moves the parameters only: pass
parameters, not a state dict with batch-norm running statistics, which would be
interpolated here like weights.

Left out: the continual-learning loop itself (training each task with SGD, the replay
memory and how it is filled), the benchmarks (the README's CodaLab runs are rotated MNIST
with 20 tasks), and the number of MC-SGD steps per task (CL-Gym takes one step over the
whole memory; ``fit`` takes any number). The learning rate and momentum of the step are arguments of ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from reference_impls.checks import require_above, require_non_negative, require_positive

from .base import is_weight

Loss = Callable[[dict[str, Tensor]], Tensor]  # parameters by name -> scalar loss


class ModeConnectivitySGD(nn.Module):
    """The merged weights w̄_t (one trainable flat vector) between two fixed end points."""

    name = "mc_sgd"

    def __init__(self, previous: Mapping[str, Tensor], continual: Mapping[str, Tensor],
                 init_position: float = 0.25, line_samples: int = 10):
        super().__init__()
        require_positive(line_samples=line_samples)
        if not 0.0 <= init_position <= 1.0:
            raise ValueError(f"init_position must lie in [0, 1] (a point between the two solutions), got {init_position}")
        self.keys = sorted(k for k in previous if is_weight(previous[k]))
        if (sorted(k for k in continual if is_weight(continual[k])) != self.keys
                or any(previous[k].shape != continual[k].shape for k in self.keys)):
            raise ValueError("previous and continual need the same parameter names and shapes")
        # entries that are not weights (step counters, a module's extra state) stay as in previous
        self.kept = {k: v for k, v in previous.items() if not is_weight(v)}
        self.shapes = [previous[k].shape for k in self.keys]
        self.register_buffer("previous", self.flatten(previous))  # w̄_{t-1}
        self.register_buffer("continual", self.flatten(continual))  # ŵ_t
        start = self.previous + init_position * (self.continual - self.previous)
        self.weights = nn.Parameter(start.clone())  # w̄_t
        self.line_samples = line_samples

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([params[k].detach().reshape(-1) for k in self.keys])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes]
        return {k: part.reshape(s) for k, part, s in zip(self.keys, flat.split(sizes), self.shapes)}

    def merged(self) -> dict[str, Tensor]:
        """w̄_t by parameter name (detached), to load into the network; the entries of
        ``previous`` that are not floating-point weights come back as they were."""
        return {**self.kept, **self.unflatten(self.weights.detach().clone())}

    def line_points(self, start: Tensor) -> list[tuple[float, Tensor]]:
        """(s, start + s (w̄_t − start)) for s = 0, 1/N, ..., 1, detached from w̄_t."""
        w = self.weights.detach()
        steps = torch.linspace(0.0, 1.0, self.line_samples + 1).tolist()
        return [(s, start + s * (w - start)) for s in steps]

    def line_gradient(self, start: Tensor, loss: Loss) -> Tensor:
        """Σ_s ∇L at each point of the line start → w̄_t, each taken with respect to its point."""
        total = torch.zeros_like(self.weights)
        for _, point in self.line_points(start):
            point = point.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(self.unflatten(point)), point)
            total = total + grad
        return total

    def direction(self, memory_loss: Loss, current_loss: Loss) -> Tensor:
        """The update direction: earlier tasks' memory loss along w̄_{t-1} → w̄_t plus task t's
        loss along ŵ_t → w̄_t (CL-Gym's ``grads_prev + grads_curr``)."""
        return self.line_gradient(self.previous, memory_loss) + self.line_gradient(self.continual, current_loss)

    @torch.no_grad()
    def line_loss(self, memory_loss: Loss, current_loss: Loss) -> Tensor:
        """Σ over both lines' points of the loss there: how low the two paths are."""
        points = [(p, memory_loss) for _, p in self.line_points(self.previous)]
        points += [(p, current_loss) for _, p in self.line_points(self.continual)]
        return torch.stack([loss(self.unflatten(p)) for p, loss in points]).sum()

    def fit(self, memory_loss: Loss, current_loss: Loss, steps: int = 1, lr: float = 0.01,
            momentum: float = 0.0) -> dict[str, Tensor]:
        """``steps`` SGD (with momentum) steps along :meth:`direction`; returns w̄_t by name."""
        require_non_negative(steps=steps)
        require_above(0, lr=lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        optimizer = torch.optim.SGD([self.weights], lr=lr, momentum=momentum)
        for _ in range(steps):
            optimizer.zero_grad()
            self.weights.grad = self.direction(memory_loss, current_loss)
            optimizer.step()
        return self.merged()
