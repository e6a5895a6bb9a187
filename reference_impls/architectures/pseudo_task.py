"""Pseudo-task augmentation: several decoders per task on one shared encoder.

Meyerson & Miikkulainen, "Pseudo-task Augmentation: From Deep Multitask Learning to
Intratask Sharing---and Back", ICML 2018 (arXiv:1803.04062).

Multi-task learning helps because the shared layers must serve several related problems.
PTA obtains that pressure even from a single task: the task gets ``D`` decoders, each an
independently initialised output layer on the same shared encoder, and every decoder is
trained on the task's own labels. Each (task, decoder) pair is a *pseudo-task*; the
encoder receives the sum of their losses,

    L = sum_t sum_d loss_t(decoder_{t,d}(encoder(x)), y_t)

so it is pushed to support several different solutions of the same problem at once.
With D = 1 this is exactly hard parameter sharing (shared-bottom); that limit is tested.
With several tasks, every task gets its own set of decoders and PTA combines with MTL.

:meth:`pseudo_task_outputs` returns every decoder's prediction and
:meth:`pseudo_task_loss` sums the losses for training. ``forward`` returns one decoder
per task, the one :meth:`select_best` chose by validation loss (decoder 0 until then), so
that the model plugs into code that expects one prediction per task; training through
``forward`` alone would train only that decoder. :meth:`forward_with_intermediate` hands
the other decoders' predictions to ``reference_impls.train`` as intermediate predictions,
which it scores with each task's loss at weight 1: with equal weighting a training step
then minimises exactly ``L`` above (with another weighting, only the selected decoders'
losses are weighted). :meth:`decode_with_intermediate` does the same from the shared
representation, for the methods that read it (Rep-MTL, MGDA-UB, RotoGrad). The loop does not call :meth:`select_best`. The paper's equation
numbers are not cited, and which decoder it reports at test time is not verified here.

Left out: the paper's decoder update strategies between meta-iterations (freezing,
perturbing or re-initialising decoders from the best one, hyperperturbation of
per-decoder dropout) and its schedules; decoders here keep their independent initial
values and are all trained by gradient descent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import head_for, trunk_for
from .registry import Problem


class PseudoTaskAugmentation(MultiTaskModel):
    """Shared encoder; ``decoders[task]`` holds D independently initialised heads per task."""

    name = "pseudo_task"

    def __init__(self, tasks: Sequence[str], encoder: nn.Module, decoders: Mapping[str, Sequence[nn.Module]]):
        super().__init__(tasks)
        if set(decoders) != set(self.tasks) or any(len(decoders[t]) == 0 for t in self.tasks):
            raise ValueError("need at least one decoder for every task")
        self.encoder = encoder
        self.decoders = nn.ModuleDict({t: nn.ModuleList(decoders[t]) for t in self.tasks})
        self.register_buffer("selected", torch.zeros(len(self.tasks), dtype=torch.long))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2,
                     num_decoders: int = 4) -> PseudoTaskAugmentation:
        require_positive(num_decoders=num_decoders)
        encoder = trunk_for(problem.input_shape, width, depth)
        decoders = {
            t: [head_for(problem.input_shape, width, d, problem.dense) for _ in range(num_decoders)]
            for t, d in problem.task_out_dims.items()
        }
        return cls(problem.tasks, encoder, decoders)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def pseudo_task_outputs_from(self, z: Tensor) -> dict[str, list[Tensor]]:
        return {t: [decoder(z) for decoder in self.decoders[t]] for t in self.tasks}

    def pseudo_task_outputs(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Every decoder's prediction, all from one pass of the shared encoder."""
        return self.pseudo_task_outputs_from(self.encode(x))

    def pseudo_task_loss(self, x: Tensor, loss_of: Callable[[str, Tensor], Tensor]) -> Tensor:
        """sum over tasks and decoders of ``loss_of(task, prediction)``: the PTA training loss."""
        outputs = self.pseudo_task_outputs(x)
        return sum(loss_of(t, y) for t in self.tasks for y in outputs[t])

    @torch.no_grad()
    def select_best(self, validation_losses: Mapping[str, Tensor]) -> None:
        """Use, per task, the decoder with the lowest validation loss (one value per decoder)."""
        for k, t in enumerate(self.tasks):
            self.selected[k] = int(torch.as_tensor(validation_losses[t]).argmin())

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.decoders[t][int(self.selected[k])](z) for k, t in enumerate(self.tasks)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def forward_with_intermediate(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """``forward``'s outputs, and ``{"decoder<d>": {task: prediction}}`` for every other decoder."""
        return self.decode_with_intermediate(self.encode(x))

    def decode_with_intermediate(self, z: Tensor) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """:meth:`forward_with_intermediate` from the shared representation (for the methods that
        read z: Rep-MTL, MGDA-UB, RotoGrad)."""
        outputs = self.pseudo_task_outputs_from(z)
        chosen = {t: int(self.selected[k]) for k, t in enumerate(self.tasks)}
        others: dict[str, dict[str, Tensor]] = {}
        for t in self.tasks:
            for d, y in enumerate(outputs[t]):
                if d != chosen[t]:
                    others.setdefault(f"decoder{d}", {})[t] = y
        return {t: outputs[t][chosen[t]] for t in self.tasks}, others

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.decoders[task].parameters()
