"""Task Routing: fixed random channel masks that carve one sub-network per task.

Strezoski, van Noord & Worring, "Many Task Learning with Task Routing", ICCV 2019,
arXiv:1903.12117.

A Task Routing Layer (TRL) sits after a convolution and multiplies its feature map by a
binary mask that belongs to the task being computed. The masks are drawn at random once,
when the model is built, and never trained: the network is fully shared, but every task
only ever sees (and only ever updates) its own subset of units. The sharing ratio
``sigma`` controls the subset size. Here ``sigma`` is the fraction of units each task
keeps *active*, so exactly ``round(sigma * C)`` of the ``C`` channels are on for every
task; two tasks overlap on about ``sigma**2 * C`` channels. (The authors' code counts
the units switched *off* instead, ``int(C * sigma_off)`` of them, truncated: ``1 - sigma``
translates it up to one unit where ``C * sigma_off`` is not whole, e.g. C = 10, sigma_off =
0.35 keeps 7 units there and 6 here. Checked against gstrezoski/TaskRouting at c13a743, whose
README trains one randomly drawn task per batch; the harness sums all tasks' losses.)

The network performs one task per pass (the route is chosen before the pass);
:meth:`TaskRouting.forward` simply runs one pass per task.

Left out: the paper's large VGG/ResNet backbones and its many-task classification
setups; this file keeps a few 3x3 conv blocks with a TRL after each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import image_head
from .registry import Problem


def random_unit_masks(
    num_tasks: int, units: int, sigma: float, generator: torch.Generator
) -> Tensor:
    """``(num_tasks, units)`` 0/1 masks with exactly ``round(sigma * units)`` ones per row."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sharing ratio sigma must lie in [0, 1], got {sigma}")
    active = round(sigma * units)
    masks = torch.zeros(num_tasks, units)
    for t in range(num_tasks):
        masks[t, torch.randperm(units, generator=generator)[:active]] = 1.0
    return masks


class TaskRoutingLayer(nn.Module):
    """Multiplies channel ``c`` of the input by ``mask[task, c]`` (a fixed 0/1 value).

    The masks are a buffer, not a parameter: they move with ``.to(device)`` and are
    saved in the state dict, but no optimiser ever touches them.
    """

    def __init__(self, units: int, num_tasks: int, sigma: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # CPU generator: same masks on any device
        self.register_buffer("masks", random_unit_masks(num_tasks, units, sigma, generator))

    def forward(self, x: Tensor, task_index: int) -> Tensor:
        mask = self.masks[task_index].to(dtype=x.dtype)
        return x * mask.view(1, -1, *([1] * (x.dim() - 2)))  # broadcast over batch and space



class TaskRouting(MultiTaskModel):
    """Shared conv trunk with a Task Routing Layer after every block, one head per task."""

    name = "trl"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: dict[str, int],
        channels: Sequence[int] = (16, 16),
        sigma: float = 0.5,
        seed: int = 0,
        dense: bool = True,
    ):
        super().__init__(tasks)
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:])
        )
        # Each layer draws its masks from its own seed so layers do not repeat one pattern.
        self.routers = nn.ModuleList(
            TaskRoutingLayer(c, len(self.tasks), sigma, seed=seed * 1000 + i)
            for i, c in enumerate(channels)
        )
        self.heads = nn.ModuleDict({t: image_head(widths[-1], out_dims[t], dense) for t in tasks})
        self.sigma = sigma

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> TaskRouting:
        if not problem.is_image:
            raise ValueError("TaskRouting here routes conv channels; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=(width, width),
                   dense=problem.dense, **kwargs)

    def features(self, x: Tensor, task: str) -> Tensor:
        """The trunk as routed for ``task``: conv -> ReLU -> TRL, block after block."""
        index = self.tasks.index(task)
        for conv, router in zip(self.convs, self.routers):
            x = router(torch.relu(conv(x)), index)
        return x

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.features(x, task))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return iter(self.heads[task].parameters())
