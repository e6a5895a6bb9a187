"""BIM: a Mamba decoder whose cross-task scan runs over all tasks' tokens in two orders and both directions.

Cao, Zhou, Li, Deng, Huang & Wang, "Enhancing Mamba Decoder with Bidirectional Interaction in
Multi-Task Dense Prediction", ICCV 2025, arXiv:2508.20376.

Letting every task read every other task (pairwise attention) costs O(T^2) in the number of
tasks T; squeezing all tasks into one bridge feature (as MTMamba's cross-task block does with a
channel concatenation) is cheaper but can lose task-specific detail. BIM keeps every task's
tokens separate and lets a selective state-space scan (:func:`.mtmamba.selective_scan`) run
over *one* sequence that holds all of them, which costs O(T * H * W):

1. **Bidirectional Interaction Scan (BI-Scan)**, in the Bidirectional Cross-task Feature Refine
   block. Each task's features are split along channels into two halves.
   - *Forward half.* **Task-first mode**: the tasks' raster-scanned maps are concatenated one
     task after another (``[task 1 pixels..., task 2 pixels..., ...]``, length T*H*W) and
     scanned, so later tasks read whole earlier tasks. The result is put back into maps and
     re-serialised in **position-first mode** (``[pixel 1 of every task, pixel 2 of every
     task, ...]``) and scanned again, so each pixel reads all tasks at the preceding pixels.
   - *Backward half.* The same two scans on the reversed sequences, so that what the forward
     scans cannot see (later pixels, later tasks) is read from the other end.
   The halves are concatenated again and each task maps them back with its own projection.
   Together every task at every pixel depends on every task at every pixel (tested), while
   the first task's first pixel in the forward half sees only itself (causality, tested).
2. **Multi-Scale Scan (MS-Scan)**, in the Multi-Scale Single-Task block: a task's map is
   scanned (four-direction SS2D, :class:`.mtmamba.SS2D`) at full resolution and at half
   resolution, and the coarse result is upsampled and added, for coarse and fine context.
3. **Decoder** as in MTMamba: per task, 2x patch expanding of the 1/4-scale encoder features
   with the 1/2-scale skip, then the cross-task block, then the task's multi-scale block.
   **Heads** predict per pixel (dense) or from the spatial mean (pooled, image-level tasks).

Secondary details are not verified (the official repository, mmm-cc/BIM_for_MTL, holds only a
README and a licence in all nine commits up to 10904ac, 2025-08-29, and we worked from the
paper's abstract and a summary of its Sec. 3): the block
order inside a refinement stage, the exact form of MS-Scan (scales and fusion), and what is
shared between the forward and backward scans (here each scan has its own SSM). Equation
numbers are not quoted for the same reason.

The expand/skip layers feed every task through the cross-task block, so they are shared; the
cross-task block's per-task output projections, the multi-scale blocks and the heads are
task-specific.

Left out: the Swin backbone and its pretraining, several refinement stages (one here) and
several MS-Scan blocks per stage (one here), the final 4x patch expanding, drop-path and the
CUDA scan kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side
from .invpt import _resize
from .mtmamba import SS2D, ExpandingEncoder, SelectiveSSM, map_heads
from .registry import Problem


def task_first(seqs: Tensor) -> Tensor:
    """``(b, T, L, c) -> (b, T*L, c)``: all of task 1's tokens, then all of task 2's, ..."""
    b, t, length, c = seqs.shape
    return seqs.reshape(b, t * length, c)


def position_first(seqs: Tensor) -> Tensor:
    """``(b, T, L, c) -> (b, L*T, c)``: every task's token at position 1, then at position 2, ..."""
    b, t, length, c = seqs.shape
    return seqs.transpose(1, 2).reshape(b, length * t, c)


def undo_task_first(seq: Tensor, tasks: int) -> Tensor:
    b, n, c = seq.shape
    return seq.reshape(b, tasks, n // tasks, c)


def undo_position_first(seq: Tensor, tasks: int) -> Tensor:
    b, n, c = seq.shape
    return seq.reshape(b, n // tasks, tasks, c).transpose(1, 2)


class BiInteractionScan(nn.Module):
    """BI-Scan over ``(b, T, L, dim)`` task sequences: forward half and reversed half, each task-first then position-first."""

    def __init__(self, dim: int, d_state: int = 4):
        super().__init__()
        if dim % 2:
            raise ValueError(f"BI-Scan splits channels in two halves; dim must be even, got {dim}")
        self.task_scan = SelectiveSSM(dim // 2, d_state, copies=2)  # copy 0: forward, copy 1: backward
        self.position_scan = SelectiveSSM(dim // 2, d_state, copies=2)

    def _two_way(self, ssm: SelectiveSSM, fwd: Tensor, bwd: Tensor) -> tuple[Tensor, Tensor]:
        """Scan ``fwd`` left to right and ``bwd`` right to left (flip, scan, flip back)."""
        out = ssm(torch.stack([fwd, bwd.flip(1)]))
        return out[0], out[1].flip(1)

    def halves(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """``(forward-half result, backward-half result)``, each ``(b, T, L, dim/2)``."""
        t = seqs.shape[1]
        fwd, bwd = seqs.chunk(2, dim=-1)
        fwd, bwd = self._two_way(self.task_scan, task_first(fwd), task_first(bwd))
        fwd, bwd = undo_task_first(fwd, t), undo_task_first(bwd, t)
        fwd, bwd = self._two_way(self.position_scan, position_first(fwd), position_first(bwd))
        return undo_position_first(fwd, t), undo_position_first(bwd, t)

    def forward(self, seqs: Tensor) -> Tensor:
        return torch.cat(self.halves(seqs), dim=-1)


class CrossTaskRefine(nn.Module):
    """LayerNorm, BI-Scan over all tasks, per-task output projection, residual (channels-last maps)."""

    def __init__(self, tasks: Sequence[str], dim: int, d_state: int = 4):
        super().__init__()
        self.tasks = tuple(tasks)
        self.norm = nn.LayerNorm(dim)
        self.scan = BiInteractionScan(dim, d_state)
        self.out = nn.ModuleDict({t: nn.Linear(dim, dim) for t in tasks})

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        b, h, w, c = next(iter(feats.values())).shape
        seqs = torch.stack([self.norm(feats[t]).reshape(b, h * w, c) for t in self.tasks], dim=1)
        mixed = self.scan(seqs)
        return {t: feats[t] + self.out[t](mixed[:, i].reshape(b, h, w, c)) for i, t in enumerate(self.tasks)}


class MultiScaleSingleTask(nn.Module):
    """MS-Scan on one task: SS2D at full and at half resolution, summed, gated, residual."""

    def __init__(self, dim: int, d_state: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fine = SS2D(dim, dim, d_state)
        self.coarse = SS2D(dim, dim, d_state)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, h, w, dim)`` channels-last."""
        z = self.norm(x)
        small = F.avg_pool2d(z.permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1)
        coarse = _resize(self.coarse(small).permute(0, 3, 1, 2), x.shape[1:3]).permute(0, 2, 3, 1)
        return x + self.out((self.fine(z) + coarse) * F.silu(self.gate(z)))


class BIM(MultiTaskModel):
    """Conv encoder (1/2, 1/4) -> per-task expand -> BI-Scan cross-task block -> per-task MS-Scan -> heads."""

    name = "bim"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 8, d_state: int = 4, dense: bool = True):
        super().__init__(tasks)
        require_positive(d_state=d_state)
        c, self.dense = channels, dense
        self.encoder = ExpandingEncoder(tasks, in_channels, c)
        self.cross = CrossTaskRefine(tasks, c, d_state)
        self.single = nn.ModuleDict({t: MultiScaleSingleTask(c, d_state) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 8, **kwargs: object) -> BIM:
        if not problem.is_image:
            raise ValueError("BIM scans 2-D feature maps of every task; it needs image inputs")
        require_image_side(problem.input_shape, 4, "its encoder downsamples the feature map by 4")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.cross(self.encoder(x))  # BI-Scan across tasks
        return map_heads(self.heads, {t: self.single[t](feats[t]) for t in self.tasks}, x.shape[-2:], self.dense)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's output projection in the cross-task block, its MS-Scan block and its head."""
        yield from self.cross.out[task].parameters()
        yield from self.single[task].parameters()
        yield from self.heads[task].parameters()
