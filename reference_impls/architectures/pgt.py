"""PGT: one transformer serves every task, steered by per-task prompts inside self-attention.

Lu, Sirejiding, Ding, Wang & Lu, "Prompt Guided Transformer for Multi-Task Dense
Prediction", arXiv:2307.15362, 2023 (IEEE Transactions on Multimedia 26, 2024).
Official code: github.com/innovator-zero/MTDP_Lib.

PGT is *task-conditional*: a single encoder and a single decoder hold all the weights,
and the model is run once per task with that task's prompts switched in. The building
piece is the Prompt-conditioned Transformer block. Each task t owns, for every block l, a
few learned prompt vectors P_{t,l} (P x C). Inside the block's self-attention they are
placed in front of the (layer-normalised) patch tokens X, so the attention runs over
[P_{t,l}; LN(X)]: every patch can read the prompts as extra keys and values. The outputs
at the prompt positions are thrown away, so prompts never travel to the next block; each
block gets fresh ones (deep prompting). The residual, the MLP and all projections are
shared, so the only thing that makes the features task-specific is which prompts the
attention sees (tested: swapping two tasks' prompts swaps their features, and without
prompts every task gets the same features).

1. **Encoder.** Patch tokens go through two stages of prompt-conditioned blocks; between
   them a patch merging step halves the grid and doubles the width (the Swin layout).
2. **Lightweight decoder.** Each stage's tokens are projected to C channels, resized to
   the finest grid, concatenated and fused by a 1x1 convolution with batch norm and
   LeakyReLU; one more prompt-conditioned block (its own task prompts) refines the map.
3. **Heads** (one per task): a learned p x p upsampling of every token (a transposed
   convolution with kernel = stride = p; the official transpose head is a rank-limited special
   case of this per-token map), or
   the mean token through a linear layer for image-level tasks.

Task-specific parameters: the task's encoder and decoder prompts and its head (the
prompt count per task is tested against P (sum_s depth_s C_s + depth_dec C)). There is no
single shared representation (features differ per task), so encode/decode are not offered.
The paper's text was not available to us; the rule above follows the official code, and
no equation numbers are cited.

Left out: the Swin backbone and its ImageNet-22k weights (here a few small global-attention
blocks over patch tokens; at this size a window would cover the whole grid, so windows,
shifted windows and the relative position bias are dropped, with learned absolute
positions instead), the third and fourth stages, dropout and stochastic depth, the
per-task loss weights and training schedule. Prompts use the official uniform
initialisation, +-sqrt(6 / (3 * 16 + C)), where 3 * 16 is the input channels times the pixels
of Swin's 4x4 patch; our channels and p x p patch take their place. Also simplified: the
official decoder has two prompted Swin layers of two blocks each (``decoder_depth`` blocks
here), its heads upsample with two 2x2 transposed convolutions through a dim/4 bottleneck
(one p x p transposed map here), and its blocks use an MLP ratio of 4 (2 here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_each_positive, require_non_negative
from .base import MultiTaskModel, split_width
from .houlsby_adapters import TokenHead, Tokenizer
from .registry import Problem


class PromptConditionedBlock(nn.Module):
    """Pre-LN transformer block whose attention also reads a task's prompts as keys/values."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2):
        super().__init__()
        split_width(dim, num_heads)
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def attend(self, tokens: Tensor, prompts: Tensor | None) -> Tensor:
        """Attention output at the N patch positions of ``[prompts; LN(tokens)]``."""
        b, n, c = tokens.shape
        context = self.norm1(tokens)  # prompts join after the norm, unnormalised (official code)
        if prompts is not None:
            context = torch.cat([prompts.expand(b, -1, -1), context], dim=1)
        q, k, v = self.qkv(context).chunk(3, dim=-1)
        q = q[:, context.shape[1] - n:]  # prompt rows would only give prompt outputs, discarded
        split = lambda z: z.reshape(b, z.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, tokens: Tensor, prompts: Tensor | None = None) -> Tensor:
        tokens = tokens + self.attend(tokens, prompts)
        return tokens + self.mlp(self.norm2(tokens))


class PatchMerging(nn.Module):
    """Halve the grid, double the width: concatenate each 2x2 neighbourhood, norm, project."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, c = tokens.shape
        maps = tokens.transpose(1, 2).reshape(b, c, *grid)
        merged = F.pixel_unshuffle(maps, 2).flatten(2).transpose(1, 2)  # (B, N/4, 4C)
        return self.reduce(self.norm(merged))


class MultiScaleFusion(nn.Module):
    """The decoder's first step: every stage to C channels at the finest grid, then a 1x1 fuse."""

    def __init__(self, stage_dims: Sequence[int], dim: int):
        super().__init__()
        # No biases before the batch norm: it subtracts the batch mean, and any constant with it.
        self.project = nn.ModuleList(nn.Linear(d, dim, bias=False) for d in stage_dims)
        self.fuse = nn.Sequential(nn.Conv2d(dim * len(stage_dims), dim, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.LeakyReLU())

    def forward(self, stages: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> Tensor:
        """Token lists ``(B, N_s, C_s)`` per stage -> fused tokens ``(B, N_0, dim)``."""
        maps = []
        for tokens, grid, project in zip(stages, grids, self.project):
            m = project(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
            maps.append(F.interpolate(m, size=grids[0], mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(maps, dim=1)).flatten(2).transpose(1, 2)


def _prompt_init(shape: Sequence[int], bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class PGT(MultiTaskModel):
    """Task-conditional transformer: shared encoder and decoder, per-task prompts and heads."""

    name = "pgt"

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = True,
        dim: int = 16,
        depths: Sequence[int] = (1, 1),
        decoder_depth: int = 1,
        num_heads: int = 2,
        num_prompts: int = 2,
    ):
        super().__init__(tasks)
        require_non_negative(decoder_depth=decoder_depth, num_prompts=num_prompts)
        require_each_positive("depths", depths)
        if len(input_shape) != 3:
            raise ValueError(f"PGT prompts a patch transformer: it needs images (C, H, W), got {tuple(input_shape)}")
        self.tokenizer = Tokenizer(input_shape, dim)
        h, w = self.tokenizer.grid
        if h % 2 ** (len(depths) - 1) or w % 2 ** (len(depths) - 1):
            raise ValueError(f"a {h}x{w} patch grid cannot be halved {len(depths) - 1} times")
        self.grids = [(h // 2**s, w // 2**s) for s in range(len(depths))]
        self.stage_dims = [dim * 2**s for s in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.ModuleList(PromptConditionedBlock(d, num_heads * 2**s) for _ in range(depth))
            for s, (d, depth) in enumerate(zip(self.stage_dims, depths))
        )
        self.merges = nn.ModuleList(PatchMerging(d) for d in self.stage_dims[:-1])
        self.fusion = MultiScaleFusion(self.stage_dims, dim)
        self.decoder_blocks = nn.ModuleList(PromptConditionedBlock(dim, num_heads) for _ in range(decoder_depth))
        # Official init: uniform in +-sqrt(6 / (pixels per patch + width)).
        bound = math.sqrt(6.0 / (input_shape[0] * self.tokenizer.patch**2 + dim))
        stage_shapes = [(depth, num_prompts, d) for d, depth in zip(self.stage_dims, depths)]
        self.encoder_prompts = nn.ModuleDict({
            t: nn.ParameterList(_prompt_init(shape, bound) for shape in stage_shapes) for t in self.tasks
        })  # P_{t,l} for every encoder block l, stacked per stage
        self.decoder_prompts = nn.ParameterDict(
            {t: _prompt_init((decoder_depth, num_prompts, dim), bound) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: TokenHead(dim, out_dims[t], self.tokenizer, dense) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> PGT:
        if not problem.is_image:
            raise ValueError("PGT prompts a patch transformer over images; vector inputs are not supported")
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dense=problem.dense, dim=width, **kwargs)

    def encoder_features(self, x: Tensor, task: str | None) -> list[Tensor]:
        """Tokens after every encoder stage, conditioned on ``task``'s prompts (None: no prompts)."""
        tokens, outputs = self.tokenizer(x), []
        for s, blocks in enumerate(self.stages):
            if s > 0:
                tokens = self.merges[s - 1](tokens, self.grids[s - 1])
            for i, block in enumerate(blocks):
                tokens = block(tokens, None if task is None else self.encoder_prompts[task][s][i])
            outputs.append(tokens)
        return outputs

    def decoder_features(self, stages: Sequence[Tensor], task: str | None) -> Tensor:
        """The lightweight decoder: fuse the stages, then prompt-conditioned blocks at the finest grid."""
        tokens = self.fusion(stages, self.grids)
        for i, block in enumerate(self.decoder_blocks):
            tokens = block(tokens, None if task is None else self.decoder_prompts[task][i])
        return tokens

    def task_features(self, x: Tensor, task: str | None) -> Tensor:
        """One task-conditional pass: the same weights, ``task``'s prompts switched in."""
        return self.decoder_features(self.encoder_features(x, task), task)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.task_features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.encoder_prompts[task]
        yield self.decoder_prompts[task]
        yield from self.heads[task].parameters()
