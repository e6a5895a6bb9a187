"""InvPT++: InvPT whose finer decoder stage attends with the coarser stage's attention in hand.

Ye & Xu, "InvPT++: Inverted Pyramid Multi-Task Transformer for Visual Scene Understanding",
TPAMI 46(12), 2024, arXiv:2306.04842.

InvPT (:mod:`.invpt`) puts the spatial tokens of every task into one sequence and runs
self-attention over it at a resolution that doubles from stage to stage. Each stage there
computes its attention from scratch, although the coarser stage has already worked out which
(task, position) pairs should read each other. InvPT++ passes that knowledge up the pyramid:
its *cross-scale self-attention* lets a finer stage's attention be shaped by the coarser
stage's, in two variants the paper names Fusion Attention and Selective Attention, and its
*encoder feature aggregation* adds the encoder's features of the matching scale to every
decoder stage.

Apart from the finer stage's attention and the encoder skip added to the coarser stage,
everything is InvPT's and imported from it (conv encoder, per-task preliminary decoders, the
joint token sequence, 2x up-sampling between stages, task heads; ``cross_scale="none"`` gives
InvPT's attention in both stages). With S_1 the coarser stage's pre-softmax scores and S_2
the finer one's, for one head (rows: every task's queries, columns: every task's pooled keys):

    S_s = Q_s K_s^T / sqrt(d_head)                   (rows: T h_s w_s queries; columns: keys)
    Ŝ_1 = resample(S_1)                              (the query grid of every task bilinearly
                                                      resized to stage 2's, and the key grid
                                                      to stage 2's pooled one where it differs)

  fusion:     A_2 = softmax( W_fuse [S_2 ; Ŝ_1] )    W_fuse: a 1x1 map over the 2H heads
                                                     stacked (H current, H passed up) to H
  selective:  A_2 = softmax( S_2 + M ),  M = 0 on the keys among the ⌈ρ K⌉ largest of the
                                          query's row of Ŝ_1 (per head), -inf elsewhere

then the stage mixes values with A_2 as InvPT's block does (``x + proj(A_2 V)``, then its MLP).
Because stage 2 average-pools its keys by 2 while its queries are twice as fine, an image whose
sides divide by 4 gives both stages the same key grid, so Ŝ_1 only needs its query axes resized.

Sources and what is ours. The paper's method section was not at hand: its abstract names the
two variants and the aggregation, and nothing more of them could be read here (the authors'
repository, prismformore/Multi-Task-Transformer at 870c6be, has no InvPT++ code; its open
issue #35 asks for exactly these two modules). The fusion variant follows the cross-stage
attention message passing of the authors' InvPT release (InvPT/models/transformers/invpt.py,
``SelfAttention.forward``: the previous stage's pre-softmax scores are upsampled 2x along each
task's query grid, stacked with the current scores along the heads and mixed back to H heads
by a 1x1 convolution), which we take to be what InvPT++ names Fusion Attention. The selective
variant is this file's own reading of the name: the coarse attention *selects* which keys
each finer query may attend to, a top-⌈ρK⌉ mask per query and head (ρ = ``keep_ratio``); the
paper may define it otherwise. Encoder feature aggregation here adds a 1x1-projected encoder
map of the matching scale to the input of each of the two stages (InvPT's sketch adds one at
the finer stage only). No equation numbers are cited: none were checked against a text of the
paper.

Left out: the ViT/Swin backbone, the third decoder stage, the paper's UP-Transformer internals
(its convolutional query/key/value projections), the 3D (Cityscapes-3D) heads, and the losses
on the preliminary predictions, which :meth:`InvPTPlusPlus.forward_with_intermediate` returns
for the caller to supervise, as InvPT's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above
from .invpt import EncoderMaps, InvPT, JointTaskBlock, _resize

CROSS_SCALE_MODES = ("fusion", "selective", "none")


def resample_scores(scores: Tensor, tasks: int, query_grid: Sequence[int], key_grid: Sequence[int],
                    new_query_grid: Sequence[int], new_key_grid: Sequence[int]) -> Tensor:
    """``(B, H, T*qh*qw, T*kh*kw)`` scores -> ``(B, H, T*qh'*qw', T*kh'*kw')``, bilinear per task grid."""
    b, heads = scores.shape[:2]
    (qh, qw), (kh, kw) = query_grid, key_grid
    (nqh, nqw), (nkh, nkw) = new_query_grid, new_key_grid
    s = scores.reshape(b, heads, tasks, qh, qw, tasks * kh * kw)
    if (qh, qw) != (nqh, nqw):  # every key's column, seen as a map over one task's query grid
        s = s.permute(0, 1, 2, 5, 3, 4).reshape(b * heads * tasks, tasks * kh * kw, qh, qw)
        s = _resize(s, (nqh, nqw)).reshape(b, heads, tasks, tasks * kh * kw, nqh, nqw).permute(0, 1, 2, 4, 5, 3)
    s = s.reshape(b, heads, tasks * nqh * nqw, tasks, kh, kw)
    if (kh, kw) != (nkh, nkw):  # every query's row, seen as a map over one task's key grid
        s = _resize(s.reshape(-1, tasks, kh, kw), (nkh, nkw))
    return s.reshape(b, heads, tasks * nqh * nqw, tasks * nkh * nkw)


class CrossScaleJointBlock(JointTaskBlock):
    """InvPT's joint block whose attention can also read the coarser stage's scores."""

    def __init__(self, dim: int, num_heads: int = 2, kv_pool: int = 1, cross_scale: str = "none",
                 keep_ratio: float = 0.5):
        super().__init__(dim, num_heads, kv_pool)
        if cross_scale not in CROSS_SCALE_MODES:
            raise ValueError(f"cross_scale must be one of {CROSS_SCALE_MODES}, got {cross_scale!r}")
        require_above(0, keep_ratio=keep_ratio)
        if keep_ratio > 1:
            raise ValueError(f"keep_ratio is the share of keys kept, at most 1, got {keep_ratio}")
        self.cross_scale, self.keep_ratio = cross_scale, keep_ratio
        # W_fuse: the 2H stacked score maps (current heads first) mixed back to H heads. No bias:
        # one added to a whole row of scores cancels in the softmax (the release's conv has one).
        self.fuse = nn.Conv2d(2 * num_heads, num_heads, 1, bias=False) if cross_scale == "fusion" else None

    def key_grid(self, h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / self.kv_pool), math.ceil(w / self.kv_pool)

    def cross_scale_scores(self, own: Tensor, passed_up: Tensor) -> Tensor:
        """The pre-softmax scores after the coarser stage's (already resampled) have had their say."""
        if self.cross_scale == "fusion":
            return self.fuse(torch.cat([own, passed_up], dim=1))
        if self.cross_scale == "selective":
            keep = max(1, math.ceil(self.keep_ratio * own.shape[-1]))
            chosen = passed_up.topk(keep, dim=-1).indices
            allowed = torch.zeros_like(own, dtype=torch.bool).scatter(-1, chosen, True)
            return own.masked_fill(~allowed, float("-inf"))
        return own

    def attend_across_scales(self, maps: Tensor, previous: tuple[Tensor, Sequence[int], Sequence[int]] | None
                             ) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, C, h, w)`` maps, the coarser stage's ``(scores, query grid, key grid)`` or None
        -> (updated maps, attention weights, the scores this stage passes on)."""
        b, t, c, h, w = maps.shape
        scores, v, queries = self.scores(maps)
        if previous is not None and self.cross_scale != "none":
            prev_scores, prev_query_grid, prev_key_grid = previous
            passed_up = resample_scores(prev_scores, t, prev_query_grid, prev_key_grid, (h, w), self.key_grid(h, w))
            scores = self.cross_scale_scores(scores, passed_up)
        weights = torch.softmax(scores, dim=-1)
        tokens = self.mix(weights, v, queries)
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens.reshape(b, t, h, w, c).permute(0, 1, 4, 2, 3), weights, scores


class InvPTPlusPlus(InvPT):
    """InvPT with cross-scale (fusion or selective) attention between its two joint stages."""

    name = "invpt_plus_plus"
    unverified_reading = ("Selective Attention as a top-⌈ρK⌉ key mask chosen by the coarser scores, Fusion "
                          "Attention taken to be the released InvPT's cross-stage score fusion, and encoder "
                          "aggregation into both stages")

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 16, num_heads: int = 2, dense: bool = True, cross_scale: str = "fusion",
                 keep_ratio: float = 0.5):
        super().__init__(tasks, in_channels, out_dims, channels=channels, num_heads=num_heads, dense=dense)
        self.stage1 = CrossScaleJointBlock(channels, num_heads)
        self.stage2 = CrossScaleJointBlock(channels, num_heads, kv_pool=2, cross_scale=cross_scale,
                                           keep_ratio=keep_ratio)
        self.encoder_skip_quarter = nn.Conv2d(channels, channels, 1)  # aggregation into stage 1 as well

    def decode_stages(self, feats: dict[str, Tensor], preds: dict[str, Tensor], encoder: EncoderMaps) -> list[Tensor]:
        """The joint token maps ``(B, T, C, h, w)`` after stage 1 (1/4) and stage 2 (1/2)."""
        return [maps for maps, _ in self.decode_stages_with_attention(feats, preds, encoder)]

    def decode_stages_with_attention(self, feats: dict[str, Tensor], preds: dict[str, Tensor], encoder: EncoderMaps
                                     ) -> list[tuple[Tensor, Tensor]]:
        """``[(maps, attention weights)]`` of both stages; stage 2's attention has read stage 1's scores."""
        maps = torch.stack([self.to_tokens[t](torch.cat([feats[t], preds[t]], 1)) for t in self.tasks], 1)
        maps = maps + self.encoder_skip_quarter(encoder.quarter).unsqueeze(1)  # encoder feature aggregation, 1/4
        stage1, weights1, scores1 = self.stage1.attend_across_scales(maps, None)
        b, t, c, h, w = stage1.shape
        half = encoder.half
        up = _resize(stage1.reshape(b * t, c, h, w), half.shape[-2:])  # inverted pyramid: 2x finer
        up = F.relu(self.upsample_refine(up)).reshape(b, t, c, *half.shape[-2:])
        stage2_in = up + self.encoder_skip(half).unsqueeze(1)  # encoder feature aggregation, 1/2
        stage2, weights2, _ = self.stage2.attend_across_scales(stage2_in, (scores1, (h, w), (h, w)))
        return [(stage1, weights1), (stage2, weights2)]
