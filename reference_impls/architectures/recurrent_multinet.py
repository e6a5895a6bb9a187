"""Recurrent multinet: every task's prediction is encoded back into the shared representation.

Bilen & Vedaldi, "Integrated Perception with Recurrent Multi-Task Neural Networks",
NeurIPS 2016, arXiv:1606.01735.

A shared-bottom network lets tasks share features but not answers. The recurrent
*multinet* also lets them share answers: an image encoder ``phi_0`` produces a shared
representation ``h``, a decoder ``psi_a`` per task reads the task's label estimate from
it, and a task *encoder* ``phi_a`` maps that estimate back into the space of ``h``.
An *integrator* merges the image code with all tasks' encoded estimates into the next
shared representation, and the loop is unrolled for a few steps:

    h^0     = phi_0(x)
    x_a^t   = psi_a(h^t)                                   for every task a     Eq. (2)
    r_a^t   = phi_a(x_a^t)                                                      Eq. (1)
    h^{t+1} = integrator(h^0, r_1^t, ..., r_K^t)                                Eq. (3)

With zero recurrent steps this is shared-bottom; with one or more, the final answer of
each task depends on every task's earlier answer, so decoders and task encoders are
shared by all tasks (only with zero steps does ``psi_a`` belong to task ``a`` alone).
The same weights are used at every step.

The integrator is the paper's second design, Eq. (5): a 1x1 convolution of the stacked
codes followed by a ReLU, which keeps h at C channels however many tasks there are. Eq. (5)
also stacks the previous h^{t-1}; ours reads the image code h^0 and the tasks' codes only.
The paper's task encoders have no parameters (class probabilities broadcast over space,
detection scores max-pooled into heat maps over their boxes); ours are learned, since our
tasks are generic: ``phi_a`` is a 1x1 convolution for dense estimates and a linear layer
broadcast over space for image-level ones. Decoders are the package's default heads.
Equation numbers are those of the NIPS copy on the first author's site (Bilen16b.pdf of
hbilen.github.io, read in the copy 9160476108/hbilen.github.io; built 2016-11-28).

:meth:`forward_steps` returns the estimates of every step. Training supervises all of them:
every step's estimate is scored by its task's loss, so the first answers are trained to be
answers too and not just codes for the next step. That is our choice: the paper gives each
task its loss (Sec. 4.1) without saying whether the estimates before the last step are
scored. :meth:`forward_with_intermediate` returns the final step as the outputs and the
earlier steps as intermediate predictions, which the training harness scores with weight 1
each; with zero steps there are none.

The paper's task encoders read probabilities (sigmoid for classes, softmax for detections),
here the raw head outputs; it runs two recurrent steps (one by default here, where leaving out
the previous state changes nothing) and starts its integrator from N(0, 0.01²).

Left out: the VGG-M image encoder, the paper's tasks (classification,
detection through region proposals, part localisation) and their losses, and its first
integrator design, Eq. (4), which stacks the codes without reducing them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


class TaskEncoder(nn.Module):
    """``phi_a``: a task estimate, dense ``(B, o, H, W)`` or image-level ``(B, o)``, to ``(B, C, H, W)``."""

    def __init__(self, out_dim: int, channels: int, dense: bool):
        super().__init__()
        self.dense = dense
        self.map = nn.Conv2d(out_dim, channels, 1) if dense else nn.Linear(out_dim, channels)

    def forward(self, estimate: Tensor, like: Tensor) -> Tensor:
        if self.dense:
            return self.map(estimate)
        return self.map(estimate)[:, :, None, None].expand_as(like)


class RecurrentMultinet(MultiTaskModel):
    """Shared image encoder, per-task decoders and task encoders, integrator, unrolled ``steps`` times."""

    name = "recurrent_multinet"
    equations_checked_in = "Bilen16b.pdf of hbilen.github.io"

    def __init__(
        self,
        tasks: Sequence[str],
        image_encoder: nn.Module,
        decoders: Mapping[str, nn.Module],
        out_dims: Mapping[str, int],
        channels: int,
        dense: bool = True,
        steps: int = 1,
    ):
        super().__init__(tasks)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.image_encoder = image_encoder
        self.decoders = nn.ModuleDict({t: decoders[t] for t in self.tasks})
        self.task_encoders = nn.ModuleDict({t: TaskEncoder(out_dims[t], channels, dense) for t in self.tasks})
        self.integrator = nn.Sequential(nn.Conv2d((1 + len(self.tasks)) * channels, channels, 1), nn.ReLU())
        self.steps = steps

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> RecurrentMultinet:
        if not problem.is_image:
            raise ValueError("this recurrent multinet integrates over conv feature maps; it needs an image problem")
        encoder = trunk_for(problem.input_shape, width, depth=2)
        return cls(problem.tasks, encoder, heads_for(problem, width), problem.task_out_dims,
                   width, dense=problem.dense, **kwargs)

    def integrate(self, h0: Tensor, estimates: Mapping[str, Tensor]) -> Tensor:
        """``h^{t+1}``: the image code and every task's encoded estimate, merged."""
        codes = [self.task_encoders[t](estimates[t], h0) for t in self.tasks]
        return self.integrator(torch.cat([h0, *codes], dim=1))

    def forward_steps(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Estimates at steps ``0 .. steps`` (step 0 is the plain shared-bottom answer)."""
        h0 = self.image_encoder(x)
        h = h0
        history = []
        for t in range(self.steps + 1):
            estimates = {task: self.decoders[task](h) for task in self.tasks}
            history.append(estimates)
            if t < self.steps:
                h = self.integrate(h0, estimates)
        return history

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_steps(x)[-1]

    def forward_with_intermediate(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The last step's estimates, and ``{"step_i": estimates}`` of every earlier step."""
        *earlier, last = self.forward_steps(x)
        return last, {f"step_{i}": estimates for i, estimates in enumerate(earlier)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Only without recurrence does a decoder serve its own task alone."""
        if task not in self.tasks:
            raise KeyError(task)
        return self.decoders[task].parameters() if self.steps == 0 else iter(())
