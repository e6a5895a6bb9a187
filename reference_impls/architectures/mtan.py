"""MTAN: a shared trunk, and per task a chain of soft attention masks over its features.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(arXiv:1803.10704), Sec. 3. The shared network produces features p^(j) at every block j.
Task i keeps its own attended copy, computed block by block:

    a_i^(j) = h_i^(j)( g_i^(j)( [u^(j) ; f^(j)(a^_i^(j-1))] ) )     the attention mask (Eq. 2)
    a^_i^(j) = a_i^(j) * p^(j)                                      element-wise (Eq. 1)

g is a 1x1 convolution with ReLU, h a 1x1 convolution with a sigmoid, so the mask lies in
(0, 1) (tested); f maps the previous attended features to the next block's width and is
shared by the tasks (as in the authors' code, github.com/lorenmt/mtan,
im2im_pred/model_segnet_mtan.py). The first block has no previous mask, so its attention
reads u^(1) alone. Task i's head reads a^_i^(L).

Simplifications, stated: the trunk is a small encoder whose blocks are single layers, so
the paper's intermediate feature u^(j) coincides with the block output p^(j); there is no
batch normalisation inside the attention modules, no SegNet encoder-decoder and no
decoder-side attention; f is a pointwise layer with a ReLU, not the paper's 3x3
convolution with pooling. DWA, the loss weighting proposed in the same paper, lives with the weighting
methods, not here.

Equation numbers checked in an ar5iv transcript of arXiv:1803.10704, found in the public GitHub
index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for


class AttentionModule(nn.Module):
    """One task's mask at one block: sigmoid(h(ReLU(g(input))))."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.g = ChannelLinear(in_channels, channels)
        self.h = ChannelLinear(channels, channels)

    def forward(self, inputs: Tensor) -> Tensor:
        return torch.sigmoid(self.h(torch.relu(self.g(inputs))))


class MTAN(MultiTaskModel):
    """Shared ``encoder`` (with ``.blocks`` and ``.widths``) plus task attention chains."""

    name = "mtan"
    equations_checked_in = "an ar5iv transcript of arXiv:1803.10704"

    def __init__(self, tasks: Sequence[str], encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        self.encoder = encoder
        widths = encoder.widths[1:]
        self.attention = nn.ModuleDict({
            t: nn.ModuleList(
                AttentionModule(c if j == 0 else 2 * c, c) for j, c in enumerate(widths)
            )
            for t in self.tasks
        })
        # f^(j), j >= 1: previous attended features -> width of block j (shared by tasks).
        self.carry = nn.ModuleList(
            nn.Sequential(ChannelLinear(widths[j - 1], widths[j]), nn.ReLU())
            for j in range(1, len(widths))
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2) -> "MTAN":
        heads = heads_for(problem, width)
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), heads)

    def attend(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """Final attended features per task and every mask a_i^(j) on the way."""
        attended: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        p = x
        for j, block in enumerate(self.encoder.blocks):
            p = block(p)  # shared p^(j) (= u^(j) for single-layer blocks)
            for t in self.tasks:
                inputs = p if j == 0 else torch.cat([p, self.carry[j - 1](attended[t])], dim=1)
                mask = self.attention[t][j](inputs)  # a_i^(j)
                masks[t].append(mask)
                attended[t] = mask * p  # a^_i^(j) = a_i^(j) * p^(j)
        return attended, masks

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        return self.attend(x)[1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        attended, _ = self.attend(x)
        return {t: self.heads[t](attended[t]) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()
