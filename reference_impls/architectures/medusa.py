"""Medusa: each task masks the shared multi-scale features, then attends across scales.

Spencer, Bowden, Hadfield. "Medusa: Universal Feature Learning via Attentional
Multitasking", CVPR 2022 Workshops (arXiv:2204.05698).

Medusa keeps all task interaction out of the decoders, so a task can be added or removed
without retraining the others, and puts two attention mechanisms in every task head:

  shared feature attention (SFA)   per task t and backbone scale s, a spatial mask
                                   m_t^s = sigmoid(conv_t^s(F^s)) in (0, 1)^{H_s x W_s} selects
                                   the backbone features the task uses: F_t^s = m_t^s ⊙ F^s
  multi-scale attention (MSA)      the masked features of all scales are projected, resized
                                   to the finest scale, and mixed per pixel with weights
                                   alpha_t^s(p) = softmax_s(score_t([G_t^1; ...; G_t^S])(p))

The backbone is shared and learns a generic representation because every task only
*selects* from it.

Left out: the ResNet/ConvNeXt backbones, the exact layer configuration of the attention
blocks (kernel sizes, intermediate convolutions), and the universal-feature-learning
protocol (freezing the backbone and training new heads).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side
from .encoders import conv_block


class MultiScaleBackbone(nn.Module):
    """Tiny shared backbone: one map per stage, each stage at half the previous resolution."""

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(
            conv_block(a, b, pool=(i > 0)) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class MedusaHead(nn.Module):
    """One task's head: SFA masks per scale, then the multi-scale attention decoder."""

    def __init__(self, channels: Sequence[int], head_channels: int, out_dim: int):
        super().__init__()
        self.mask_convs = nn.ModuleList(nn.Conv2d(c, 1, 3, padding=1) for c in channels)
        self.projections = nn.ModuleList(nn.Conv2d(c, head_channels, 1) for c in channels)
        self.scale_scores = nn.Conv2d(head_channels * len(channels), len(channels), 1)
        self.out = nn.Conv2d(head_channels, out_dim, 1)

    def masks(self, features: Sequence[Tensor]) -> list[Tensor]:
        """SFA: m^s = sigmoid(conv(F^s)), one (B, 1, H_s, W_s) mask per scale."""
        return [torch.sigmoid(conv(f)) for conv, f in zip(self.mask_convs, features)]

    def scale_weights(self, projected: Sequence[Tensor]) -> Tensor:
        """MSA: per-pixel softmax over scales, (B, S, H, W)."""
        return torch.softmax(self.scale_scores(torch.cat(list(projected), dim=1)), dim=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        masked = [m * f for m, f in zip(self.masks(features), features)]
        projected = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            for p, f in zip(self.projections, masked)
        ]
        weights = self.scale_weights(projected)
        fused = sum(weights[:, s : s + 1] * g for s, g in enumerate(projected))
        return self.out(fused)


class Medusa(MultiTaskModel):
    """Shared multi-scale backbone; every task has SFA masks and an MSA head."""

    name = "medusa"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: Mapping[str, int],
        channels: Sequence[int] = (8, 16, 32),
        head_channels: int = 16,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(head_channels=head_channels)
        self.backbone = MultiScaleBackbone(in_channels, channels)
        self.heads = nn.ModuleDict({t: MedusaHead(channels, head_channels, out_dims[t]) for t in self.tasks})
        self.dense = dense

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs):  # noqa: ANN001, ANN206
        """Stages of width/2, width and 2 width channels (the channels double each time a stage
        halves the map); every head works at ``width``."""
        if not problem.is_image:
            raise ValueError("Medusa attends over multi-scale feature maps: it needs image inputs")
        require_image_side(problem.input_shape, 4, "its encoder downsamples the feature map by 4")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=(width // 2, width, 2 * width), head_channels=width, dense=problem.dense, **kwargs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # The shared representation is a list of maps, so encode()/decode() are not offered.
        features = self.backbone(x)
        out = {t: self.heads[t](features) for t in self.tasks}
        return out if self.dense else {t: y.mean(dim=(2, 3)) for t, y in out.items()}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
