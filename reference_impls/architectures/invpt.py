"""InvPT: one transformer attends across all tasks' tokens while the resolution grows.

Ye & Xu, "Inverted Pyramid Multi-task Transformer for Dense Scene Understanding",
ECCV 2022, arXiv:2203.07997.

Earlier dense multi-task decoders (PAD-Net, MTI-Net) let tasks exchange information with
convolutions, i.e. locally. InvPT instead puts the spatial tokens of *every* task into one
sequence and runs self-attention over it, so any pixel of any task can read any pixel of any
other task. Because attention over high-resolution maps is expensive, the decoder is an
*inverted* pyramid: it starts at the coarsest backbone scale and doubles the resolution at
every stage (the paper's UP-Transformer blocks), shrinking keys and values before attention.

1. **Encoder.** A small convolutional backbone gives features at 1/2 and 1/4 resolution.
2. **Task-specific preliminary decoders** (Sec. 3.2). For each task a conv block turns the
   1/4-scale features into task features ``F_t`` and a 1x1 layer into a preliminary
   prediction ``P_t`` (deeply supervised in the paper); ``[F_t; P_t]`` is projected to the
   task's tokens.
3. **Joint transformer, stage 1 (1/4 scale).** Tokens of all tasks are concatenated into
   one sequence of ``T * h * w`` tokens; a pre-LN transformer block (global multi-task
   self-attention + MLP) updates them.
4. **Up-sampling stage 2 (1/2 scale).** Each task's tokens are reshaped into a map,
   upsampled 2x and refined by a conv, the encoder's 1/2-scale features are added
   (multi-scale feature aggregation), and a second joint block attends over all tasks'
   tokens with keys/values average-pooled by 2 (the paper's reduction of K, V at high
   resolution, which keeps the cost of the finer stage down).
5. **Task heads** map each task's tokens to its output at input resolution (dense), or
   average it over space (pooled, image-level tasks).

Only the heads are task-specific: the preliminary decoders feed every task through the
joint attention, so they count as shared (as MTI-Net's task blocks do here).

Left out: the ViT/Swin backbone and its pretraining, the third decoder stage, the
cross-scale passing of attention messages between stages, the paper's exact UP-Transformer
internals (reshaped convolutional projections), and the losses on the preliminary
predictions (returned by :meth:`InvPT.forward_with_intermediate` for the caller to supervise).

Checked against the authors' release (prismformore/Multi-Task-Transformer, folder InvPT/):
models/transformers/invpt.py, models/transformers/transformer_decoder.py and
models/transformer_net.py. Where that code differs and this sketch does not say so above:
each of its stages normalises all tokens with one LayerNorm and then average-pools the keys
and values (by 2, 4 and 8 in its three stages, so the coarsest stage is pooled too), while its
queries pass a per-task depthwise stride-2 conv + BatchNorm and the attention output is
interpolated back to full size; here queries stay at full size, keys/values get their own
LayerNorm after pooling, and stage 1 is not pooled. Its scores are scaled by 1/sqrt of the whole
token width, not of one head's. Its up-sampling is per task (bilinear 2x, then two conv +
BatchNorm + ReLU) and halves the width at every stage; here one conv is shared by the tasks and
the width stays. Its heads read, per task, the sum over all stages of the normalised outputs
(1x1-reduced after the first stage, with one LayerNorm over all tasks' channels together)
upsampled to twice the last stage's size and refined by a task's conv + BatchNorm + ReLU; here
they read the last stage only. Its preliminary decoders have two conv + BatchNorm + ReLU
blocks, here one conv + ReLU; its MLPs are 4x wide, here 2x. It starts the decoder at half the
coarsest backbone scale, here at that scale; its encoder skips pass a 3x3 (or transposed)
convolution, here a 1x1 one. It upsamples the preliminary predictions to the image before
their loss; ``forward_with_intermediate`` returns them at the decoder's first scale and the
caller resizes them. Drop-path (0.15) and its truncated-normal initialisation are left out.
Checked at commit 870c6be.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MultiTaskModel, require_image_side, split_width
from .encoders import conv_block
from .registry import Problem


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class JointTaskBlock(nn.Module):
    """Pre-LN transformer block over the concatenated tokens of all tasks.

    ``kv_pool`` > 1 average-pools every task's map before it serves as keys and values, so
    the finer stage attends from ``T*h*w`` queries to ``T*h*w/kv_pool^2`` keys.
    """

    def __init__(self, dim: int, num_heads: int = 2, kv_pool: int = 1):
        super().__init__()
        split_width(dim, num_heads)
        self.num_heads, self.kv_pool = num_heads, kv_pool
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _pooled_tokens(self, maps: Tensor) -> Tensor:
        """``(B, T, C, h, w)`` -> ``(B, T*h'*w', C)`` key/value tokens."""
        b, t, c, h, w = maps.shape
        flat = maps.reshape(b * t, c, h, w)
        if self.kv_pool > 1:
            # non-overlapping windows; on an odd side the last one is partial (as in the release)
            flat = F.avg_pool2d(flat, self.kv_pool, self.kv_pool, ceil_mode=True)
        return flat.reshape(b, t, c, -1).permute(0, 1, 3, 2).reshape(b, -1, c)

    def attention(self, maps: Tensor) -> Tensor:
        """Attention weights ``(B, heads, T*h*w, T*h'*w')`` between all tasks' tokens."""
        return self._attend(maps)[1]

    def scores(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(S = q k^T / sqrt(d_head), values per head, query tokens)`` of ``(B, T, C, h, w)`` maps."""
        b, t, c, h, w = maps.shape
        queries = maps.permute(0, 1, 3, 4, 2).reshape(b, t * h * w, c)
        k, v = self.kv(self.norm_kv(self._pooled_tokens(maps))).chunk(2, dim=-1)
        q = self.q(self.norm_q(queries))
        split = lambda z: z.reshape(b, z.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), v, queries

    def mix(self, weights: Tensor, values: Tensor, queries: Tensor) -> Tensor:
        """The query tokens plus the projected attention-weighted values (before the MLP)."""
        b, n, c = queries.shape
        return queries + self.proj((weights @ values).transpose(1, 2).reshape(b, n, c))

    def _attend(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        scores, values, queries = self.scores(maps)
        weights = torch.softmax(scores, dim=-1)
        return self.mix(weights, values, queries), weights

    def forward(self, maps: Tensor) -> Tensor:
        """``(B, T, C, h, w)`` -> same shape; every token has seen every task's tokens."""
        b, t, c, h, w = maps.shape
        tokens, _ = self._attend(maps)
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3)


class EncoderMaps(NamedTuple):
    """The encoder's features at 1/2 and 1/4 scale, kept for the decoder stages that add them back."""
    half: Tensor
    quarter: Tensor


class InvPT(MultiTaskModel):
    """Conv encoder -> preliminary task decoders -> 2-stage joint multi-task transformer -> heads."""

    name = "invpt"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 16, num_heads: int = 2, dense: bool = True):
        super().__init__(tasks)
        c, self.dense = channels, dense
        self.stem = conv_block(in_channels, c)
        self.down_half = conv_block(c, c, pool=True)  # 1/2 scale
        self.down_quarter = conv_block(c, c, pool=True)  # 1/4 scale
        self.preliminary = nn.ModuleDict({t: conv_block(c, c) for t in tasks})
        self.preliminary_predictors = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})
        self.to_tokens = nn.ModuleDict({t: nn.Conv2d(c + out_dims[t], c, 1) for t in tasks})
        self.stage1 = JointTaskBlock(c, num_heads)
        self.upsample_refine = nn.Conv2d(c, c, 3, padding=1)  # shared by the tasks' maps
        self.encoder_skip = nn.Conv2d(c, c, 1)  # 1/2-scale encoder features into stage 2
        self.stage2 = JointTaskBlock(c, num_heads, kv_pool=2)
        self.heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> InvPT:
        if not problem.is_image:
            raise ValueError("InvPT decodes spatial tokens of image features; it needs image inputs")
        require_image_side(problem.input_shape, 4, "its encoder downsamples the feature map by 4")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def preliminary_decoding(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], EncoderMaps]:
        """``(task features F_t at 1/4 scale, preliminary predictions P_t, the encoder's maps)``."""
        half = self.down_half(self.stem(x))
        quarter = self.down_quarter(half)
        feats = {t: self.preliminary[t](quarter) for t in self.tasks}
        preds = {t: self.preliminary_predictors[t](feats[t]) for t in self.tasks}
        return feats, preds, EncoderMaps(half, quarter)

    def decode_stages(self, feats: dict[str, Tensor], preds: dict[str, Tensor], encoder: EncoderMaps) -> list[Tensor]:
        """The joint token maps ``(B, T, C, h, w)`` after stage 1 (1/4) and stage 2 (1/2)."""
        maps = torch.stack([self.to_tokens[t](torch.cat([feats[t], preds[t]], 1)) for t in self.tasks], 1)
        stage1 = self.stage1(maps)
        b, t, c, h, w = stage1.shape
        half = encoder.half
        up = _resize(stage1.reshape(b * t, c, h, w), half.shape[-2:])  # inverted pyramid: 2x finer
        up = F.relu(self.upsample_refine(up)).reshape(b, t, c, *half.shape[-2:])
        stage2 = self.stage2(up + self.encoder_skip(half).unsqueeze(1))
        return [stage1, stage2]

    def forward_with_intermediate(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(final outputs, preliminary predictions at 1/4 scale)``."""
        feats, preds, encoder = self.preliminary_decoding(x)
        return self.heads_from_tokens(self.decode_stages(feats, preds, encoder)[-1], x.shape[-2:]), preds

    def heads_from_tokens(self, maps: Tensor, size: Sequence[int]) -> dict[str, Tensor]:
        outputs = {}
        for i, t in enumerate(self.tasks):
            out = self.heads[t](maps[:, i])
            outputs[t] = _resize(out, size) if self.dense else out.mean(dim=(2, 3))
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_intermediate(x)[0]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Only the task's head: preliminary decoders reach every task through attention."""
        yield from self.heads[task].parameters()
