"""MulT: task decoders share one attention map, computed from a reference task.

Bhattacharjee, Zhang, Süsstrunk, Salzmann. "MulT: An End-to-End Multitask Learning
Transformer", CVPR 2022 (arXiv:2205.08303).

A shared transformer encoder embeds the image; every task has its own transformer
decoder. In each decoder layer the attention map is computed *once*, from the query and
key projections of a reference task r, and every task applies it to its own values:

    A^l   = softmax(Q_r^l K_r^l^T / sqrt(d))      from task r's decoder state at layer l
    Y_t^l = A^l V_t^l                              for every task t (its own values)

so the spatial dependencies found for the reference task steer all tasks, and the
gradients of every task's loss flow into the reference task's query/key projections.
Non-reference decoders have no query/key projections at all.

Left out: the Swin encoder with its multi-scale skip connections into the decoders, the
relative position bias inside the shared attention, up-sampling decoder stages, and the
paper's task-weighted loss. The reference task is a constructor argument (default: the
first task).

Checked against the authors' release (IVRL/MulT), mainly the decoder head
src/Swin-Transformer-MulT/mmseg/models/decode_heads/swin_transformer_dea4.py with its variants
swin_transformer_dea1.py to dea3.py. There depth is hard-wired as the reference task (one linear
gives its q, k and v; segmentation only gets a value projection), and in dea4 every block's
projections read the task's stream concatenated with the encoder skip of that scale, while dea1
(the head the shipped NYU config selects) takes q, k from the skip alone in each stage's first
block. The release attends within shifted 7x7 windows; here attention spans all patch tokens,
and a learned absolute position embedding stands in for the relative bias. MLP hidden widths are
2x the model width here, 4x there. Also left out: the release's dropout (0.1) before its output
layers, drop-path (0.3) and truncated-normal initialisation. Checked at commit d71bcbe.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side, split_width


class SharedAttentionLayer(nn.Module):
    """One task's decoder layer; only the reference task's layer owns query/key weights."""

    def __init__(self, dim: int, num_heads: int, computes_attention: bool):
        super().__init__()
        split_width(dim, num_heads)
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.query_key = nn.Linear(dim, 2 * dim) if computes_attention else None
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _heads(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def attention_map(self, h: Tensor) -> Tensor:
        """A = softmax(Q K^T / sqrt(d_h)) from this (reference) task's state: (B, heads, N, N)."""
        q, k = self.query_key(self.norm1(h)).chunk(2, dim=-1)
        q, k = self._heads(q), self._heads(k)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)

    def forward(self, h: Tensor, attention: Tensor) -> Tensor:
        """Y = A V with this task's values, then the usual residual MLP."""
        v = self._heads(self.value(self.norm1(h)))
        mixed = (attention @ v).transpose(1, 2).reshape(h.shape)
        h = h + self.proj(mixed)
        return h + self.mlp(self.norm2(h))


class MulT(MultiTaskModel):
    """Shared encoder, per-task decoders tied by the reference task's attention maps."""

    name = "mult"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: Mapping[str, int],
        image_size: tuple[int, int] = (8, 8),
        patch_size: int = 2,
        dim: int = 16,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        num_heads: int = 2,
        reference_task: str | None = None,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(dim=dim, encoder_depth=encoder_depth, patch_size=patch_size)
        self.reference = reference_task or self.tasks[0]
        if self.reference not in self.tasks:
            raise ValueError(f"reference task {self.reference!r} is not one of {self.tasks}")
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_size = patch_size
        self.dense = dense
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.positions = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)
        split_width(dim, num_heads)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # GELU MLPs, as in the Swin encoder it stands in for
        self.encoder = nn.TransformerEncoder(layer, encoder_depth, enable_nested_tensor=False)
        self.decoders = nn.ModuleDict({
            t: nn.ModuleList(SharedAttentionLayer(dim, num_heads, t == self.reference) for _ in range(decoder_depth))
            for t in self.tasks
        })
        self.heads = nn.ModuleDict({t: nn.Linear(dim, out_dims[t]) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs):  # noqa: ANN001, ANN206
        if not problem.is_image:
            raise ValueError("MulT decodes patch tokens: it needs image inputs")
        require_image_side(problem.input_shape, 2, "its patches are at least 2x2")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   image_size=tuple(problem.input_shape[1:]), dim=width, dense=problem.dense, **kwargs)

    def decode_with_attention(self, x: Tensor) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Per-task token states and, per layer, the attention map each task used."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positions
        shared = self.encoder(tokens)
        states = {t: shared for t in self.tasks}
        used: list[dict[str, Tensor]] = []
        for layer in range(len(self.decoders[self.reference])):
            attention = self.decoders[self.reference][layer].attention_map(states[self.reference])
            used.append({t: attention for t in self.tasks})
            states = {t: self.decoders[t][layer](states[t], attention) for t in self.tasks}
        return states, used

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        states, _ = self.decode_with_attention(x)
        outputs = {}
        for t in self.tasks:
            y = self.heads[t](states[t])  # (B, N, out)
            if not self.dense:
                outputs[t] = y.mean(dim=1)
                continue
            y = y.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)
            outputs[t] = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
        layers = self.decoders[task]
        if task != self.reference:
            yield from layers.parameters()
            return
        # The reference decoder's states feed everyone's attention; only its last layer's
        # value path (after the attention map is taken) serves the reference task alone.
        last = layers[-1]
        for module in (last.value, last.proj, last.norm2, last.mlp):
            yield from module.parameters()
