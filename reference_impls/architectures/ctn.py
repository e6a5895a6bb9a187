"""CompositeTasking: a per-pixel task map decides which task each pixel predicts.

Popović, Paudel, Probst, Sun & Van Gool, "CompositeTasking: Understanding Images by
Spatial Composition of Tasks", CVPR 2021, arXiv:2012.09030
(code: github.com/nikola3794/composite-tasking).

A multi-head network predicts every task everywhere. The CompositeTasking network (CTN)
instead takes, next to the image, a *Task Palette*: a map that assigns one task to every
pixel. It has a single decoder and predicts, at each pixel, only the task asked for
there. How the decoder learns which task to compute:

1. every task has a fixed code ``z_t``; a small *task representation* network (fully
   connected layers with leaky ReLUs, on the L2-normalised code) maps it to a latent
   ``w_t``; painting ``w_{T(p)}`` into pixel ``p`` of the palette ``T`` gives a latent
   map ``W``;
2. every decoder block (a *task composition block*) is a convolution, a normalisation
   without learned affine parameters, and a SPADE-style spatial affine transform whose
   scale and shift are predicted per pixel from ``W``:

       y = gamma(W) * norm(conv(x)) + beta(W)

   followed by a leaky ReLU; ``gamma`` and ``beta`` are convolutions of a shared
   hidden map computed from ``W``, with ``gamma``'s bias initialised to 1.

The encoder is not conditioned: it is one shared representation (:meth:`encode`).
Every weight serves every task. Asking for a single task everywhere (a uniform
palette) is the multi-task use: :meth:`forward` does that once per task.

Small-scale choices. The decoder's convolutions here are 1x1 (the official decoder's main
convolutions are 3x3, its skip convolutions 1x1); the affine transforms are 1x1 and the
normalisation is batch normalisation without affine parameters, as in the official
configurations (``cond_batch1x1`` in all of them and in train.py; nikola3794/composite-tasking
at c759a87). In eval mode the decoder here is then per pixel: the prediction at
``p`` depends on the encoder features at ``p`` and on the task ``T(p)`` only, so a
composite prediction equals, pixel by pixel, the single-task predictions (a property of this
small version: the official network downsamples the task map and uses 3x3 convolutions). Tasks of
different widths read the first ``out_dims[t]`` channels of one shared output layer
(our choice); for image-level (pooled) problems a task's map is averaged over pixels.

Left out: the ResNet/U-Net encoder with its skip connections into the decoder, the
paper's Task Palette generators (random mosaics, semantic rules) and its losses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import trunk_for
from .registry import Problem


class TaskRepresentation(nn.Module):
    """``z_t -> w_t``: L2-normalise the task code, then fully connected + leaky ReLU layers."""

    def __init__(self, code_dim: int, latent_dim: int, layers: int = 2):
        super().__init__()
        widths = [code_dim] + [latent_dim] * layers
        self.mapping = nn.Sequential(*(
            m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))
        ))

    def forward(self, codes: Tensor) -> Tensor:
        return self.mapping(F.normalize(codes, dim=-1))


class SpatialAffine(nn.Module):
    """``norm(x) * gamma(W) + beta(W)`` with per-pixel scale and shift from the latent map ``W``."""

    def __init__(self, channels: int, latent_dim: int, hidden: int, kernel_size: int = 1):
        super().__init__()
        pad = kernel_size // 2
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(latent_dim, hidden, kernel_size, padding=pad), nn.LeakyReLU())
        self.gamma = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        self.beta = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        nn.init.ones_(self.gamma.bias)  # start close to the plain normalisation
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: Tensor, latent_map: Tensor) -> Tensor:
        h = self.shared(latent_map)
        return self.norm(x) * self.gamma(h) + self.beta(h)


class TaskComposition(nn.Module):
    """One decoder block: convolution, spatially task-conditioned normalisation, leaky ReLU."""

    def __init__(self, channels: int, latent_dim: int, hidden: int, kernel_size: int = 1):
        super().__init__()
        # no bias: the normalisation after it subtracts the batch mean, bias included
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.affine = SpatialAffine(channels, latent_dim, hidden, kernel_size)

    def forward(self, x: Tensor, latent_map: Tensor) -> Tensor:
        return F.leaky_relu(self.affine(self.conv(x), latent_map))


class CompositeTaskingNet(MultiTaskModel):
    """Shared encoder, one decoder steered per pixel by a task map."""

    name = "ctn"
    training_procedure = ("each step decodes a random Task Palette (forward_composite() with a mosaic task map), each "
                          "pixel scored by its own task's loss only (not implemented here)")

    def __init__(
        self,
        tasks: Sequence[str],
        encoder: nn.Module,
        channels: int,
        out_dims: dict[str, int],
        dense: bool = True,
        decoder_depth: int = 2,
        latent_dim: int = 16,
        kernel_size: int = 1,
    ):
        super().__init__(tasks)
        require_positive(kernel_size=kernel_size, latent_dim=latent_dim)
        self.encoder = encoder
        self.dense = dense
        self.out_dims = {t: out_dims[t] for t in self.tasks}
        # Fixed one-hot task codes z_t: a buffer, so no weight belongs to one task.
        self.register_buffer("task_codes", torch.eye(len(self.tasks)))
        self.representation = TaskRepresentation(len(self.tasks), latent_dim)
        self.blocks = nn.ModuleList(
            TaskComposition(channels, latent_dim, latent_dim, kernel_size) for _ in range(decoder_depth)
        )
        self.output = nn.Conv2d(channels, max(self.out_dims.values()), 1)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> CompositeTaskingNet:
        if not problem.is_image:
            raise ValueError("CompositeTasking composes tasks over pixels; it needs an image problem")
        encoder = trunk_for(problem.input_shape, width, depth=2)
        return cls(problem.tasks, encoder, width, problem.task_out_dims, dense=problem.dense, **kwargs)

    def latent_map(self, task_map: Tensor) -> Tensor:
        """``(B, H, W)`` task indices -> ``(B, latent, H, W)``: each pixel gets its task's ``w``."""
        w = self.representation(self.task_codes)  # (K, latent)
        return w[task_map].permute(0, 3, 1, 2)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_composite(self, z: Tensor, task_map: Tensor) -> Tensor:
        """All ``max(out_dims)`` output channels, each pixel computing the task ``task_map`` puts there."""
        latent = self.latent_map(task_map)
        for block in self.blocks:
            z = block(z, latent)
        return self.output(z)

    def forward_composite(self, x: Tensor, task_map: Tensor) -> Tensor:
        return self.decode_composite(self.encode(x), task_map)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for k, t in enumerate(self.tasks):
            uniform = torch.full((z.shape[0], *z.shape[2:]), k, dtype=torch.long, device=z.device)
            y = self.decode_composite(z, uniform)[:, : self.out_dims[t]]
            outputs[t] = y if self.dense else y.mean(dim=(2, 3))
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.tasks:
            raise KeyError(task)
        return iter(())  # one decoder: every weight serves every task
