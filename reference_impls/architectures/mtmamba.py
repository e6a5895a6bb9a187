"""MTMamba: a decoder of self-task and cross-task Mamba blocks for dense multi-task prediction.

Lin, Jiang, Chen, Zhang, Liu & Chen, "MTMamba: Enhancing Multi-Task Dense Scene Understanding by
Mamba-Based Decoders", ECCV 2024, arXiv:2407.02228.

Transformer decoders (InvPT) model long-range and cross-task context with attention, whose cost
grows with the square of the number of tokens. MTMamba keeps the encoder-decoder layout but
builds the decoder from state-space (Mamba) blocks, which read a token sequence in linear time:

1. **Selective scan (S6, from Mamba).** Per channel d and state n, a linear recurrence
   ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t`` and read-out ``y_t = C_t · h_t + D x_t``
   (Eqs. (3)-(5), with the D x_t term of Eq. (2)). What makes it *selective* is that the step
   size Δ_t and the maps B_t, C_t are computed from the token x_t itself (Eqs. (6)-(8)), so the
   model chooses per token how much to remember. ``exp(Δ A)`` is the zero-order-hold
   discretisation of A; ``Δ B`` is the simplified (Euler) one of Eq. (5), as in Mamba's code.
   :func:`selective_scan` evaluates the recurrence chunk by chunk in closed form (decays are
   cumulative sums of ``Δ A``); the test compares it with the step-by-step loop.
2. **SS2D (from VMamba).** An image is unrolled into four sequences (row by row, column by
   column, and both reversed), each scanned by its own selective SSM; the four results are
   folded back and summed, so every pixel sees every other pixel (Eqs. (10)-(12)). The class
   :class:`SS2D` is the paper's Mamba-based feature extractor around that scan: linear map,
   convolution, SiLU, scan and LN, as in Eq. (13).
3. **Self-task Mamba (STM) block**, one per task: ``F + W_out(SS2D(LN F) * SiLU(W_z LN F))``
   (Eqs. (14)-(18)).
4. **Cross-task Mamba (CTM) block.** The tasks' features are concatenated along channels and
   scanned by one shared SS2D, giving a global multi-task feature; each task also scans its
   own features, and a task-specific gate computed from the task's features mixes the two:
   ``F_t + W_t(g_t * shared + (1 - g_t) * own_t)``, ``g_t = sigmoid(W_g,t LN_t F_t)``
   (Eqs. (19)-(25)). Eq. (24) as printed gives g_t to the task's own feature and 1 - g_t to
   the shared one; like the official code we swap them, the same family of gates since
   1 - sigmoid(a) = sigmoid(-a) and the gate's linear map has no bias.
5. **Decoder stage.** Each task upsamples the coarse features 2x, concatenates the encoder's
   skip features of that scale and projects them (the paper's patch expanding), then runs
   its STM block; the CTM block follows (Eqs. (26)-(29)). **Heads** predict per pixel (dense)
   or from the spatial mean (pooled, image-level tasks).

With a single decoder stage each task's STM block feeds the shared CTM branch, so it reaches
every task and counts as shared; the CTM block's per-task parts and the heads are task-specific.

The blocks follow the paper's Sec. 3 and the official code (EnVision-Research/MTMamba,
``models/utils.py``, ``models/CTM.py``). Equation numbers are those of the ECCV 2024 version
(LNCS 15128, pp. 314-330) on the first author's site (Baijiong-Lin/Baijiong-Lin.github.io,
files/eccv24_mtmamba.pdf); the arXiv version was not checked.

Left out: the Swin backbone and its pretraining (Eq. (9)), three decoder stages (one here)
with two STM blocks each (Eq. (28); one here), the final 4x patch expanding, drop-path, the
Δ-initialisation range of Mamba, and the hardware-aware CUDA scan kernel (a plain PyTorch
scan here). The official code uses a state size of 16 (``d_state`` 4 here), halves the width
in its patch expanding (kept here), and trains every configuration on the sum of the log task
losses (EnVision-Research/MTMamba).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side
from .encoders import conv_block
from .invpt import _resize
from .registry import Problem


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                   chunk: int = 16) -> Tensor:
    """S6 recurrence ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``, ``y_t = C_t·h_t + D x_t``, h_0 = 0.

    Shapes: x, delta ``(b, L, d)``; A ``(d, n)`` or ``(b, d, n)`` (negative); B, C ``(b, L, n)``;
    D ``(d,)`` or ``(b, d)``. Within a chunk, ``h_t = exp(S_t) h_0 + Σ_{s<=t} exp(S_t - S_s) Δ_s B_s x_s``
    with ``S = cumsum(Δ A)``; every exponent is <= 0, so nothing overflows. The last state
    carries over to the next chunk, so the cost stays linear in L.
    """
    b, length, d = x.shape
    A = A.expand(b, d, A.shape[-1])[:, None]  # (b, 1, d, n)
    D = D.expand(b, d)[:, None]
    h = x.new_zeros(b, d, A.shape[-1])
    outputs = []
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        log_decay = (delta[:, part, :, None] * A).cumsum(dim=1)  # S_t: (b, l, d, n)
        inputs = (delta[:, part] * x[:, part])[..., None] * B[:, part, None, :]  # Δ B x: (b, l, d, n)
        l = log_decay.shape[1]
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril().view(1, l, l, 1, 1)
        gaps = log_decay[:, :, None] - log_decay[:, None, :]  # S_t - S_s: (b, t, s, d, n)
        decay = torch.where(causal, gaps, torch.full_like(gaps, -math.inf)).exp()
        states = log_decay.exp() * h[:, None] + (decay * inputs[:, None]).sum(dim=2)
        outputs.append(torch.einsum("bldn,bln->bld", states, C[:, part]))
        h = states[:, -1]
    return torch.cat(outputs, dim=1) + x * D


class SelectiveSSM(nn.Module):
    """Mamba's S6 layer, ``copies`` independent ones run as a batch (SS2D's four directions).

    Δ, B and C are computed from each token; A (negative, stored as log(-A)) and D are learned.
    """

    def __init__(self, dim: int, d_state: int = 4, dt_rank: int = 1, copies: int = 1):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Parameter(torch.randn(copies, dim, dt_rank + 2 * d_state) / math.sqrt(dim))
        self.dt_proj = nn.Parameter(torch.empty(copies, dt_rank, dim).uniform_(-dt_rank**-0.5, dt_rank**-0.5))
        self.dt_bias = nn.Parameter(torch.full((copies, dim), math.log(math.expm1(0.01))))  # softplus -> Δ = 0.01
        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(copies, dim, 1))
        self.D = nn.Parameter(torch.ones(copies, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(copies, b, L, dim) -> (copies, b, L, dim)``, each sequence read left to right."""
        k, b, length, dim = x.shape
        dt, B, C = torch.einsum("kbld,kdr->kblr", x, self.x_proj).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(torch.einsum("kblr,krd->kbld", dt, self.dt_proj) + self.dt_bias[:, None, None])
        repeat = lambda p: p.repeat_interleave(b, dim=0)  # noqa: E731  (copy k's parameters for its b rows)
        y = selective_scan(x.reshape(k * b, length, dim), delta.reshape(k * b, length, dim),
                           repeat(-self.A_log.exp()), B.reshape(k * b, length, -1),
                           C.reshape(k * b, length, -1), repeat(self.D))
        return y.reshape(k, b, length, dim)


def _four_way_sequences(x: Tensor) -> Tensor:
    """``(b, c, h, w) -> (4, b, h*w, c)``: row-major, column-major and both reversed."""
    rows = x.flatten(2).transpose(1, 2)
    cols = x.transpose(2, 3).flatten(2).transpose(1, 2)
    return torch.stack([rows, cols, rows.flip(1), cols.flip(1)])


def _fold_four_ways(ys: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`_four_way_sequences`, summing the four directions: ``-> (b, c, h, w)``."""
    rows, cols = ys[0] + ys[2].flip(1), ys[1] + ys[3].flip(1)
    b, _, c = rows.shape
    rows = rows.transpose(1, 2).reshape(b, c, h, w)
    cols = cols.transpose(1, 2).reshape(b, c, w, h).transpose(2, 3)
    return rows + cols


class SS2D(nn.Module):
    """Linear in, depthwise 3x3 conv + SiLU, four-direction selective scan, LayerNorm.

    Maps ``(b, h, w, in_dim)`` to ``(b, h, w, inner)``; each direction has its own SSM.
    """

    def __init__(self, in_dim: int, inner: int, d_state: int = 4):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.ssm = SelectiveSSM(inner, d_state, copies=4)
        self.out_norm = nn.LayerNorm(inner)

    def forward(self, x: Tensor) -> Tensor:
        _, h, w, _ = x.shape
        x = F.silu(self.conv(self.in_proj(x).permute(0, 3, 1, 2)))
        ys = self.ssm(_four_way_sequences(x))
        return self.out_norm(_fold_four_ways(ys, h, w).permute(0, 2, 3, 1))


class STMBlock(nn.Module):
    """Self-task Mamba block: ``F + W_out(SS2D(LN F) * SiLU(W_z LN F))`` on one task's map."""

    def __init__(self, dim: int, expand: int = 2, d_state: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, expand * dim, d_state)
        self.gate = nn.Linear(dim, expand * dim, bias=False)
        self.out = nn.Linear(expand * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, h, w, dim)`` channels-last."""
        z = self.norm(x)
        return x + self.out(self.ssm(z) * F.silu(self.gate(z)))


class CTMBlock(nn.Module):
    """Cross-task Mamba block: a shared SS2D over all tasks' channels, gated with each task's own."""

    def __init__(self, tasks: Sequence[str], dim: int, expand: int = 2, d_state: int = 4):
        super().__init__()
        self.tasks, inner = tuple(tasks), expand * dim
        self.shared_norm = nn.LayerNorm(len(tasks) * dim)
        self.shared = SS2D(len(tasks) * dim, inner, d_state)
        self.norm = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.own = nn.ModuleDict({t: SS2D(dim, inner, d_state) for t in tasks})
        self.gate = nn.ModuleDict({t: nn.Linear(dim, inner, bias=False) for t in tasks})
        self.out = nn.ModuleDict({t: nn.Linear(inner, dim, bias=False) for t in tasks})

    def gates(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``g_t = sigmoid(W_g,t LN_t F_t)``: per pixel and channel, how much task t takes from the shared scan."""
        return {t: torch.sigmoid(self.gate[t](self.norm[t](feats[t]))) for t in self.tasks}

    def forward(self, feats: dict[str, Tensor], gates: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Channels-last maps per task in and out; ``gates`` overrides g_t (for tests)."""
        shared = self.shared(self.shared_norm(torch.cat([feats[t] for t in self.tasks], dim=-1)))
        gates = self.gates(feats) if gates is None else gates
        out = {}
        for t in self.tasks:
            own = self.own[t](self.norm[t](feats[t]))
            out[t] = feats[t] + self.out[t](gates[t] * shared + (1 - gates[t]) * own)
        return out


class ExpandingEncoder(nn.Module):
    """Conv stem down to 1/2 and 1/4 scale, then per task: 2x2 patch expanding of the 1/4-scale
    features back to 1/2 (linear expand, 2x2 rearrange, LayerNorm, as in Swin-Unet and the
    official MTMamba decoder), concatenated with the 1/2-scale skip and projected to ``channels``.

    Returns one channels-last map per task. MTMamba and BIM both start this way.
    """

    def __init__(self, tasks: Sequence[str], in_channels: int, channels: int):
        super().__init__()
        self.tasks, c = tuple(tasks), channels
        self.stem = conv_block(in_channels, c)
        self.down_half = conv_block(c, c, pool=True)
        self.down_quarter = conv_block(c, c, pool=True)
        self.expand = nn.ModuleDict({t: nn.Linear(c, 4 * c, bias=False) for t in tasks})  # 2x2 patch expanding
        self.expand_norm = nn.ModuleDict({t: nn.LayerNorm(c) for t in tasks})  # ... which ends in a LayerNorm
        self.fuse_skip = nn.ModuleDict({t: nn.Linear(2 * c, c) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        half = self.down_half(self.stem(x))
        quarter = self.down_quarter(half)
        out = {}
        for t in self.tasks:
            up = F.pixel_shuffle(self.expand[t](quarter.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), 2)
            up = self.expand_norm[t](up.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            up = _resize(up, half.shape[-2:])  # odd sizes: pooling floored, match the skip
            out[t] = self.fuse_skip[t](torch.cat([up, half], dim=1).permute(0, 2, 3, 1))
        return out


def map_heads(heads: nn.ModuleDict, feats: dict[str, Tensor], size: Sequence[int], dense: bool) -> dict[str, Tensor]:
    """Each task's 1x1 head on its channels-last map: upsampled to ``size`` if dense, else pooled."""
    outputs = {}
    for t, f in feats.items():
        out = heads[t](f.permute(0, 3, 1, 2))
        outputs[t] = _resize(out, size) if dense else out.mean(dim=(2, 3))
    return outputs


class MTMamba(MultiTaskModel):
    """Conv encoder (1/2, 1/4) -> per-task expand + STM -> shared CTM -> heads."""

    name = "mtmamba"
    equations_checked_in = "Baijiong-Lin/Baijiong-Lin.github.io, files/eccv24_mtmamba.pdf"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 8, d_state: int = 4, dense: bool = True):
        super().__init__(tasks)
        require_positive(d_state=d_state)
        c, self.dense = channels, dense
        self.encoder = ExpandingEncoder(tasks, in_channels, c)
        self.stm = nn.ModuleDict({t: STMBlock(c, d_state=d_state) for t in tasks})
        self.ctm = CTMBlock(tasks, c, d_state=d_state)
        self.heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 8, **kwargs: object) -> MTMamba:
        if not problem.is_image:
            raise ValueError("MTMamba scans 2-D feature maps in four directions; it needs image inputs")
        require_image_side(problem.input_shape, 4, "its encoder downsamples the feature map by 4")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        own = {t: self.stm[t](f) for t, f in self.encoder(x).items()}  # self-task Mamba blocks
        return map_heads(self.heads, self.ctm(own), x.shape[-2:], self.dense)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The CTM block's private branch, gate and output map for ``task``, and its head."""
        for part in (self.ctm.norm, self.ctm.own, self.ctm.gate, self.ctm.out, self.heads):
            yield from part[task].parameters()
