"""ASTMT: a shared residual network that single-tasks, adapted per task by SE and adapters.

Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks",
CVPR 2019, arXiv:1904.08918.

The network is trained on all tasks but runs one task per pass. Inside each shared
residual block, task ``t`` changes the computation in two light-weight ways (the
paper's Fig. 2):

* **residual adapters (RA)**: a task-specific 1x1 convolution runs in parallel with each
  shared 3x3 convolution and is added to its output, ``conv(x) + A_t(x)``, refining the
  shared features for the task;
* **Squeeze-and-Excitation (SE) modulation**: a task-specific SE unit rescales the
  block's residual branch channel by channel, ``u * sigmoid(W2 ReLU(W1 avgpool(u)))``,
  letting the task attend to its channels and suppress the others.

Adapters are zero-initialised, so the untrained adapters leave the shared path
untouched; an SE unit whose gate is 1 everywhere is neutral, and with both neutral the
model is exactly the shared residual network (:meth:`shared_features`).

Left out: the adversarial task discriminator on the gradients (the paper's third
ingredient, which makes task gradients statistically indistinguishable), the
DeepLab-v3+ ResNet backbone and decoder, and batch normalisation (shared or task-specific:
the blocks here have none). The blocks are basic blocks with two 3x3 convolutions, each with
its adapter; the official bottleneck blocks have one 3x3 convolution and one adapter. The SE
reduction defaults to 4 (16 in the official encoder, 4 in some decoder layers). Checked against
facebookresearch/astmt at 4d5d9bf: there every task's SE unit starts as a copy of the same
pretrained weights (independently random here), the DeepLab decoder is shared with its own
per-task SE units, adapters and batch norms (only its last 1x1 layer is per task), and the
discriminator reads the task losses' gradients with respect to the last decoder feature map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import image_head
from .registry import Problem


class SqueezeExcitation(nn.Module):
    """Channel gate in (0, 1) computed from the globally pooled input."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, u: Tensor) -> Tensor:
        s = u.mean(dim=(2, 3))
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))

    def forward(self, u: Tensor) -> Tensor:
        return u * self.gate(u)[:, :, None, None]


class TaskAdaptedBlock(nn.Module):
    """Shared 3x3 residual block + per-task parallel adapters and SE on the residual branch."""

    def __init__(self, channels: int, tasks: Sequence[str], reduction: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adapters1 = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1, bias=False) for t in tasks})
        self.adapters2 = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1, bias=False) for t in tasks})
        for adapter in [*self.adapters1.values(), *self.adapters2.values()]:
            nn.init.zeros_(adapter.weight)
        self.se = nn.ModuleDict({t: SqueezeExcitation(channels, reduction) for t in tasks})

    def forward(self, x: Tensor, task: str | None) -> Tensor:
        """``task=None`` runs the shared path alone (no adapters, no SE)."""
        h = self.conv1(x) + (self.adapters1[task](x) if task else 0)  # RA: conv(x) + A_t(x)
        h = torch.relu(h)
        u = self.conv2(h) + (self.adapters2[task](h) if task else 0)
        if task:
            u = self.se[task](u)  # SE modulation of the residual branch
        return torch.relu(x + u)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for module in (self.adapters1[task], self.adapters2[task], self.se[task]):
            yield from module.parameters()



class AttentiveSingleTasking(MultiTaskModel):
    """Stem conv, ``depth`` task-adapted residual blocks, one head per task."""

    name = "astmt"
    training_procedure = ("a task discriminator on the gradients of the last decoder features is trained "
                          "adversarially so that the tasks' gradients become indistinguishable (not implemented here)")

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: dict[str, int],
        channels: int = 16,
        depth: int = 2,
        reduction: int = 4,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(channels=channels, reduction=reduction)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(TaskAdaptedBlock(channels, tasks, reduction) for _ in range(depth))
        self.heads = nn.ModuleDict({t: image_head(channels, out_dims[t], dense) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> AttentiveSingleTasking:
        if not problem.is_image:
            raise ValueError("ASTMT adapts conv blocks; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=width,
                   dense=problem.dense, **kwargs)

    def _run(self, x: Tensor, task: str | None) -> Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x, task)
        return x

    def features(self, x: Tensor, task: str) -> Tensor:
        return self._run(x, task)

    def shared_features(self, x: Tensor) -> Tensor:
        """The backbone with every task-specific module removed."""
        return self._run(x, None)

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.features(x, task))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.task_parameters(task)
        yield from self.heads[task].parameters()
