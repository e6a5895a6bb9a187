"""ECMT: slimmable encoder and task decoders; a task preference and a budget pick the widths.

Aich, Schulter, Roy-Chowdhury, Chandraker, Suh. "Efficient Controllable Multi-Task
Architectures", ICCV 2023 (arXiv:2308.11744). No official code was found.

One multi-task SuperNet is trained so that, after deployment and without retraining, a
user can ask for (i) a relative importance of the tasks and (ii) a compute budget. Both the
shared encoder and every task decoder are *slimmable*: a layer of full width W run at
ratio r uses only its first round(r W) output channels (and as many input channels as it is
given), so every narrower SubNet shares the wider one's leading weights. The paper's key
rule, kept here:

* task importance is expressed through decoder capacity: a more preferred task gets a
  wider decoder (never a narrower one; tested);
* the total cost is controlled jointly through the shared encoder's width: the widest
  encoder that, with those decoders, fits the budget is chosen (tested: within budget,
  monotone in the budget).

Training follows the SuperNet recipe: losses of the full network and of sampled SubNets,
plus Configuration-Invariant Knowledge Distillation (CI-KD), which pulls the shared
encoder's representation under any width configuration towards that of the widest encoder
(taken as a fixed target). :meth:`ECMT.ci_kd_loss` is that term with a mean squared error.

The training harness trains the configured network (by default the full one) on the task
losses and cannot sample SubNets, since their losses need the targets
(:attr:`ECMT.training_procedure` says so). It does add :meth:`ECMT.auxiliary_loss`:
``ci_kd_weight`` x CI-KD at an encoder width drawn from the grid below 1 in each training
forward pass, so the narrower encoders still learn to match the widest (``ci_kd_weight`` = 1
is our default: the paper's weight is not stated here).

Not verified, so chosen here and marked: the CI-KD distance (MSE), the encoder keeping a
fixed *output* width (only its hidden layers slim) so that representations of different
configurations can be compared, the width grid (0.25, 0.5, 0.75, 1), the rule mapping a
preference to a decoder width (the smallest grid width >= preference / max preference),
and the cost proxy (active parameters, proportional to MACs at fixed resolution). The
paper's search may evaluate candidates differently; its equation numbers were not
checked. The task's brief suggested a hypernetwork controller: that is the predecessor
(Raychaudhuri et al., CVPR 2022); ECMT replaces it with this search over a SuperNet.

Left out: the ResNet/MobileNet/ViT backbones and dense decoders of the paper, switchable
batch norm, the exact SubNet sampling schedule, the datasets and the controllability metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel
from .registry import Problem

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def active(width: int, ratio: float) -> int:
    """Channels a layer of full ``width`` uses at ``ratio`` (at least one)."""
    return max(1, round(ratio * width))


class SlimmableLayer(nn.Module):
    """Conv (images) or linear (vectors) layer that can run on its leading channels only."""

    def __init__(self, in_max: int, out_max: int, image: bool, kernel_size: int = 3):
        super().__init__()
        k = kernel_size if image else 1
        self.image = image
        self.weight = nn.Parameter(torch.empty(out_max, in_max, k, k))
        self.bias = nn.Parameter(torch.zeros(out_max))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: Tensor, out_channels: int | None = None) -> Tensor:
        out = out_channels or self.weight.shape[0]
        w, b = self.weight[:out, : x.shape[1]], self.bias[:out]
        if self.image:
            return F.conv2d(x, w, b, padding=w.shape[-1] // 2)
        return F.linear(x, w[:, :, 0, 0], b)

    def cost(self, in_channels: int, out_channels: int) -> int:
        """Active parameters at these widths."""
        return out_channels * (in_channels * self.weight.shape[-1] ** 2 + 1)


class ECMT(MultiTaskModel):
    """Slimmable shared encoder (fixed output width) and slimmable per-task decoders."""

    name = "ecmt"
    per_pass_attributes = ("_last_ci_kd",)
    training_procedure = ("each step trains randomly sampled SubNets (configure()) on the task losses next to the "
                          "full network, plus ci_kd_loss() towards the widest encoder")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        width: int = 16,
        depth: int = 2,
        decoder_width: int = 16,
        ci_kd_weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(tasks)
        require_non_negative(ci_kd_weight=ci_kd_weight)
        self.ci_kd_weight = ci_kd_weight
        self.generator = torch.Generator().manual_seed(seed)  # draws the CI-KD width; CPU, same on every device
        self._last_ci_kd: Tensor | None = None  # set by a training forward pass, read by auxiliary_loss
        image = len(input_shape) == 3
        self.pool = image and not dense
        self.in_channels = input_shape[0]
        self.encoder = nn.ModuleList(
            SlimmableLayer(self.in_channels if i == 0 else width, width, image) for i in range(depth)
        )
        self.decoders = nn.ModuleDict({
            t: nn.ModuleList([SlimmableLayer(width, decoder_width, image),
                              SlimmableLayer(decoder_width, out_dims[t], image, kernel_size=1)])
            for t in self.tasks
        })
        self.encoder_ratio = 1.0
        self.decoder_ratios = {t: 1.0 for t in self.tasks}

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> ECMT:
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dense=problem.dense,
                   width=width, decoder_width=width, **kwargs)

    def configure(self, encoder_ratio: float, decoder_ratios: Mapping[str, float]) -> None:
        """Select the SubNet that :meth:`forward` runs."""
        self.encoder_ratio = encoder_ratio
        self.decoder_ratios = {t: decoder_ratios.get(t, 1.0) for t in self.tasks}

    def encode(self, x: Tensor) -> Tensor:
        """Shared representation; hidden layers slim, the last keeps its full width."""
        for i, layer in enumerate(self.encoder):
            last = i == len(self.encoder) - 1
            x = torch.relu(layer(x, None if last else active(layer.weight.shape[0], self.encoder_ratio)))
        return x

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            hidden, head = self.decoders[t]
            h = torch.relu(hidden(z, active(hidden.weight.shape[0], self.decoder_ratios[t])))
            y = head(h)
            out[t] = y.mean(dim=(2, 3)) if self.pool else y
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = self.decode(self.encode(x))
        self._last_ci_kd = None
        if self.training and self.ci_kd_weight > 0:
            ratio = WIDTHS[int(torch.randint(len(WIDTHS) - 1, (1,), generator=self.generator))]
            self._last_ci_kd = self.ci_kd_loss(x, ratio)
        return outputs

    def auxiliary_loss(self) -> Tensor:
        """``ci_kd_weight`` x the CI-KD term of the last training forward pass (0 in eval or at weight 0)."""
        if self._last_ci_kd is None:
            return self.encoder[0].weight.new_zeros(())
        return self.ci_kd_weight * self._last_ci_kd

    def get_extra_state(self) -> dict[str, object]:
        """The SubNet :meth:`configure` selected and the CI-KD width draws' random state, so a
        checkpoint runs the same SubNet (tested)."""
        return {"encoder_ratio": self.encoder_ratio, "decoder_ratios": dict(self.decoder_ratios),
                "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, object]) -> None:
        self.configure(state["encoder_ratio"], state["decoder_ratios"])
        self.generator.set_state(state["generator"])

    def cost(self, encoder_ratio: float, decoder_ratios: Mapping[str, float]) -> int:
        """Active parameters of a configuration (the budget's unit)."""
        total, width_in = 0, self.in_channels
        for i, layer in enumerate(self.encoder):
            full = layer.weight.shape[0]
            width_out = full if i == len(self.encoder) - 1 else active(full, encoder_ratio)
            total, width_in = total + layer.cost(width_in, width_out), width_out
        for t in self.tasks:
            hidden, head = self.decoders[t]
            h = active(hidden.weight.shape[0], decoder_ratios[t])
            total += hidden.cost(width_in, h) + head.cost(h, head.weight.shape[0])
        return total

    def controller(self, preference: Mapping[str, float], budget: float) -> tuple[float, dict[str, float]]:
        """(encoder ratio, decoder ratios) for a task preference and a budget in (0, 1] of the full cost.

        When not even the narrowest encoder fits, every decoder is narrowed by one grid width (so
        their order is kept) and the search repeats; with every decoder at the narrowest width,
        the narrowest SubNet is returned even if it exceeds the budget.
        """
        top = max(preference[t] for t in self.tasks)
        decoders = {t: next(r for r in WIDTHS if r >= preference[t] / top - 1e-9) for t in self.tasks}
        limit = budget * self.cost(1.0, {t: 1.0 for t in self.tasks})
        while True:
            fitting = [r for r in WIDTHS if self.cost(r, decoders) <= limit]
            if fitting:
                return max(fitting), decoders
            if all(r == WIDTHS[0] for r in decoders.values()):
                return WIDTHS[0], decoders  # nothing smaller exists: the narrowest SubNet
            decoders = {t: WIDTHS[max(0, WIDTHS.index(r) - 1)] for t, r in decoders.items()}

    def ci_kd_loss(self, x: Tensor, encoder_ratio: float) -> Tensor:
        """CI-KD: the encoder at ``encoder_ratio`` mimics the widest encoder (a fixed target)."""
        kept = self.encoder_ratio
        try:  # the model's own width comes back even if a forward pass raises
            self.encoder_ratio = 1.0
            with torch.no_grad():
                target = self.encode(x)
            self.encoder_ratio = encoder_ratio
            student = self.encode(x)
        finally:
            self.encoder_ratio = kept
        return F.mse_loss(student, target)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.decoders[task].parameters()
