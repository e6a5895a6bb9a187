"""DeMT: deformable mixers make task features, a task-aware transformer decodes them.

Xu, Yang & Zhang, "DeMT: Deformable Mixer Transformer for Multi-Task Learning of Dense
Prediction", AAAI 2023, arXiv:2301.03461.

DeMT pairs a convolutional, locally adaptive encoder with a query-based transformer decoder:

1. **Deformable mixer encoder** (one per task, on shared backbone features). Each mixer
   is a *spatial-aware deformable* operator, a depthwise 3x3 convolution whose nine
   sampling points are moved by offsets predicted from the input (deformable convolution),
   so each task samples the locations informative for it, with a residual connection;
   then a *channel-aware mixing* operator (a 1x1 convolution: channels talk to each other
   at every location). This is the order and the single residual of the official code's
   ``DefMixer`` as first released (yangyangxu0/DeMT, ``demt_head.py``), a ConvMixer layout.
   The sampling here is bilinear, via ``bilinear.grid_sample`` (``F.grid_sample``'s values);
   with zero offsets it is exactly the ordinary depthwise 3x3 convolution on the regular grid.
2. **Task interaction block.** The deformed features of all tasks are concatenated as one
   token sequence and mixed by multi-head self-attention, giving task-interacted features.
3. **Task query block.** For each task, its own deformed features are the *queries* and the
   task-interacted features the *keys and values* of a cross-attention (+ MLP), so each task
   selects from the multi-task features what it needs.
4. **Heads** predict each task per pixel at 1/2 scale, upsampled to the input (dense), or
   from the spatial average (pooled).

A task's deformable mixer feeds every task through the interaction block, so it is shared;
the task query blocks and heads are task-specific.

Left out: the Swin/HRNet backbone and its multi-scale features, BatchNorm, the modulation
masks and offset groups of the paper's deformable convolution (the official call passes no
mask), several mixer repetitions per task
(depth d = 1 here), and the paper's exact decoder depths and widths.

Differences from the official code, kept on purpose or unverified: (a) its deformable operator
(``ChlSpl``) is not a depthwise 3x3 one: each input channel is sampled at its own learned
position per pixel and the channels are then combined by a dense 1x1 weight; its offsets are
a randomly initialised convolution of the absolute sampling coordinates, non-zero at the
start, where ours start at zero on the regular grid; the generic deformable convolution is
kept here (yangyangxu0/DeMT at b638e14). (b) The repository's later commit of ``demt_head.py``
(e5dc5b1, March 2023) puts the 1x1 channel mixing *before* the residual deformable operator;
the order here is that of its first release (575d11f). (c) Its decoder uses plain multi-head
attention followed by a LayerNorm'd linear map, with no residual in the interaction block and
no MLP; it also passes (batch, tokens, channels) tensors to ``nn.MultiheadAttention`` without
``batch_first``, which PyTorch reads as (tokens, batch, channels). None of this is reproduced:
pre-LN attention blocks over the tokens, with an MLP, here. (d) Its shared Linear + LayerNorm
projection of the backbone features before the mixers and the heads' 3x3 conv-BN-ReLU
bottleneck are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MultiTaskModel, require_image_side, split_width
from .bilinear import grid_sample
from .encoders import conv_block
from .registry import Problem


class DeformableDepthwiseConv(nn.Module):
    """Depthwise 3x3 convolution whose 9 taps are shifted by learned, per-pixel offsets.

    ``offsets`` has 2 channels per tap, ``(dx, dy)`` in pixels, predicted by a 3x3
    convolution initialised to zero (training starts from the regular grid).
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.randn(channels, taps) / taps)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.offset = nn.Conv2d(channels, 2 * taps, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def sample(self, x: Tensor, offsets: Tensor) -> Tensor:
        """``sum_k w_k * x(p + p_k + Δp_k)`` with bilinear sampling, zeros outside the image."""
        b, c, h, w = x.shape
        r = self.kernel_size // 2
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                                torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
        out = torch.zeros_like(x)
        for k in range(self.kernel_size * self.kernel_size):
            ky, kx = k // self.kernel_size - r, k % self.kernel_size - r
            px = xs + kx + offsets[:, 2 * k]  # (B, h, w) absolute pixel coordinates
            py = ys + ky + offsets[:, 2 * k + 1]
            # grid_sample wants [-1, 1]; with align_corners=False pixel i's centre is (2i+1)/w - 1.
            grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
            sampled = grid_sample(x, grid, "zeros")  # F.grid_sample's values; see bilinear.py for why not it
            out = out + self.weight[:, k].view(1, c, 1, 1) * sampled
        return out + self.bias.view(1, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.sample(x, self.offset(x))


class DeformableMixer(nn.Module):
    """``GELU(1x1(x'))`` with ``x' = x + GELU(deform(x))``: residual deformable sampling, then channel mixing."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel_mix = nn.Conv2d(channels, channels, 1)
        self.spatial = DeformableDepthwiseConv(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = x + F.gelu(self.spatial(x))  # spatial-aware deformable operator
        return F.gelu(self.channel_mix(x))  # channel-aware mixing


class CrossAttention(nn.Module):
    """Pre-LN multi-head attention of ``queries`` over ``context`` plus an MLP, both residual.

    With ``context = queries`` it is the task interaction block's self-attention.
    """

    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        split_width(dim, num_heads)
        self.num_heads = num_heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """``(B, Nq, C)`` queries attend over ``(B, Nk, C)`` context; returns ``(B, Nq, C)``."""
        b, nq, c = queries.shape
        split = lambda z: z.reshape(b, z.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q = split(self.q(self.norm_q(queries)))
        k, v = (split(z) for z in self.kv(self.norm_kv(context)).chunk(2, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = queries + self.proj((weights @ v).transpose(1, 2).reshape(b, nq, c))
        return x + self.mlp(self.norm_mlp(x))


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


class DeMT(MultiTaskModel):
    """Backbone -> per-task deformable mixers -> task interaction -> per-task query blocks -> heads."""

    name = "demt"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 16, num_heads: int = 1, dense: bool = True):
        super().__init__(tasks)
        c, self.dense = channels, dense
        self.backbone = nn.Sequential(conv_block(in_channels, c), conv_block(c, c, pool=True))
        self.mixers = nn.ModuleDict({t: DeformableMixer(c) for t in tasks})
        self.interaction = CrossAttention(c, num_heads)
        self.task_query = nn.ModuleDict({t: CrossAttention(c, num_heads) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> DeMT:
        if not problem.is_image:
            raise ValueError("DeMT's deformable mixers sample image locations; it needs image inputs")
        require_image_side(problem.input_shape, 2, "its encoder halves the feature map")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def deformed_features(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.backbone(x)
        return {t: self.mixers[t](shared) for t in self.tasks}

    def decode_tasks(self, deformed: dict[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
        """Task interaction over all tasks' tokens, then each task queries the result."""
        b, c, h, w = next(iter(deformed.values())).shape
        joint = torch.cat([_tokens(deformed[t]) for t in self.tasks], dim=1)
        interacted = self.interaction(joint, joint)
        outputs = {}
        for t in self.tasks:
            task_tokens = self.task_query[t](_tokens(deformed[t]), interacted)
            out = self.heads[t](task_tokens.transpose(1, 2).reshape(b, c, h, w))
            outputs[t] = (F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
                          if self.dense else out.mean(dim=(2, 3)))
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode_tasks(self.deformed_features(x), x.shape[-2:])

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's query block and head (its mixer feeds every task via interaction)."""
        yield from self.task_query[task].parameters()
        yield from self.heads[task].parameters()
