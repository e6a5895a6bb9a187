"""StableMTL: a latent diffusion denoiser turned into a one-step, task-prompted multi-task regressor.

Cao, Lopes & de Charette, "StableMTL: Repurposing Latent Diffusion Models for Multi-Task
Learning from Partially Annotated Synthetic Datasets", arXiv 2025, arXiv:2506.08013
(official code: github.com/astra-vision/StableMTL).

StableMTL starts from Stable Diffusion and keeps its frozen VAE. The image and every task's
label map are encoded into the VAE's latent space; the denoiser (the UNet) is asked, in a single
step at the last timestep (t = 999) from a deterministic all-zero input latent concatenated with
the image latent, for the clean latent of *one* task ("sample" prediction). Which task is
named by a task encoding fed through cross-attention (the text prompt of the original model).
One latent MSE serves every task, so no per-task losses need balancing.

Tasks talk through **task attention**. A frozen copy of the single-stream model (the auxiliary
streams) is run once per other task; the trainable main stream, predicting the target task, adds
to each self-attention output an attention in which that output's token at a location is
the only query and the auxiliary streams' tokens *at the same location* are the keys and values
(task-specific key/value projections, a zero-initialised output projection). N-to-N interaction
between task streams thus becomes a 1-to-N attention per token.

Here: the frozen VAE is a fixed random orthogonal 1x1 map (task maps are zero-padded to the
latent width), so its decoder is its transpose; the UNet is a small patch-free transformer
(input convolution, self-attention + task attention, cross-attention to the task encoding, MLP,
output convolution); the auxiliary streams are a frozen copy of the main stream taken at
construction (:meth:`StableMTL.freeze_auxiliary` refreshes it, as after the paper's single-stream
stage). The task encoding stands in for the frozen text encoder's embedding of the task's name
("depth", "optical flow"), which is a few tokens long: here ``num_task_tokens`` learned tokens
per task (4 by default, our choice). It must be more than one token for the cross-attention to
depend on its queries: over a single key the attention weights are all 1, and the query
projection would never receive a gradient. The equations are not numbered: we read the
official code, not the paper's text.

``python -m reference_impls.train`` trains the second stage only, with the auxiliary streams
frozen at their initial weights and the task losses in output space, and says so
(``training_procedure``): the paper first trains the single stream, copies it into the
auxiliary streams, and trains with :meth:`StableMTL.latent_loss`.

Left out: the pretrained Stable Diffusion 2 weights, VAE and text encoder (random frozen
stand-ins here), the UNet's resolutions and skip connections, the first (single-stream)
training stage, the official masking of auxiliary tasks in training (with probability 0.4 per
layer, one task drawn in proportion to its mean attention, the same for the whole batch;
astra-vision/StableMTL at f44e254, whose keys and values also have separate layer norms, one
shared per task here), the two-frame inputs
of the flow tasks, scale/shift-invariant losses and the synthetic datasets; and, from the
official task attention, its four heads and its maps: a layer norm then a small MLP for the
query (owned by the target task) and for each task's key and value, where here one head, one
query map shared by all tasks, and linear key and value maps after their layer norms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .demt import CrossAttention
from .diffusionmtl import TimestepEmbedding
from .registry import Problem

LAST_TIMESTEP = 999


class FrozenLatentCodec(nn.Module):
    """Stand-in for the frozen VAE: a fixed orthogonal 1x1 map (decoder = its transpose)."""

    def __init__(self, latent_channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(latent_channels, latent_channels, generator=g))
        self.register_buffer("matrix", q)

    def encode(self, maps: Tensor) -> Tensor:
        padded = nn.functional.pad(maps, (0, 0, 0, 0, 0, self.matrix.shape[0] - maps.shape[1]))
        return torch.einsum("lc,bchw->blhw", self.matrix.to(maps), padded)

    def decode(self, latent: Tensor, channels: int) -> Tensor:
        return torch.einsum("lc,blhw->bchw", self.matrix.to(latent), latent)[:, :channels]


class TaskAttention(nn.Module):
    """One query per token (main stream) over the N auxiliary streams' tokens at that location."""

    def __init__(self, tasks: Sequence[str], dim: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.norm_kv = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.to_k = nn.ModuleDict({t: nn.Linear(dim, dim, bias=False) for t in tasks})
        self.to_v = nn.ModuleDict({t: nn.Linear(dim, dim, bias=False) for t in tasks})
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)  # starts as the single-stream model
        nn.init.zeros_(self.out.bias)

    def weights(self, main: Tensor, auxiliary: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token attention ``(B, N_tokens, N_tasks)`` over the tasks and the values."""
        q = self.to_q(self.norm_q(main))
        k = torch.stack([self.to_k[t](self.norm_kv[t](a)) for t, a in auxiliary.items()], dim=2)
        v = torch.stack([self.to_v[t](self.norm_kv[t](a)) for t, a in auxiliary.items()], dim=2)
        w = torch.softmax(torch.einsum("bnc,bnkc->bnk", q, k) / q.shape[-1] ** 0.5, dim=-1)
        return w, v

    def forward(self, main: Tensor, auxiliary: Mapping[str, Tensor]) -> Tensor:
        w, v = self.weights(main, auxiliary)
        return self.out(torch.einsum("bnk,bnkc->bnc", w, v))


class StreamBlock(nn.Module):
    """Self-attention (+ task attention) -> cross-attention to the task encoding -> MLP."""

    def __init__(self, tasks: Sequence[str], dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        split_width(dim, num_heads)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.task_attention = TaskAttention(tasks, dim)
        self.prompt = CrossAttention(dim, num_heads)  # attention to the task encoding, then MLP

    def forward(self, h: Tensor, task_encoding: Tensor,
                auxiliary: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Returns the new tokens and the self-attention residual (what auxiliary streams share)."""
        normed = self.norm(h)
        residual = self.self_attention(normed, normed, normed, need_weights=False)[0]
        if auxiliary:
            residual_main = residual + self.task_attention(residual, auxiliary)  # query: self-attention output
        else:
            residual_main = residual
        return self.prompt(h + residual_main, task_encoding), residual


class LatentDenoiser(nn.Module):
    """``(image latent, input latent, task) -> clean task latent`` at the last timestep."""

    def __init__(self, tasks: Sequence[str], latent: int, dim: int, depth: int, num_heads: int,
                 num_task_tokens: int = 4):
        super().__init__()
        require_positive(num_task_tokens=num_task_tokens)
        self.tasks = tuple(tasks)
        self.inp = nn.Conv2d(2 * latent, dim, 3, padding=1)
        self.time = TimestepEmbedding(dim)
        self.task_tokens = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(1, num_task_tokens, dim) * 0.5) for t in tasks})
        self.blocks = nn.ModuleList(StreamBlock(tasks, dim, num_heads) for _ in range(depth))
        self.out = nn.Conv2d(dim, latent, 3, padding=1)

    def forward(self, image_latent: Tensor, task: str,
                auxiliary: Sequence[Mapping[str, Tensor]] | None = None) -> tuple[Tensor, list[Tensor]]:
        """The predicted latent and each block's self-attention residual (the stream's features)."""
        b, _, h, w = image_latent.shape
        x = torch.cat([image_latent, torch.zeros_like(image_latent)], 1)  # deterministic input
        t = torch.full((b,), LAST_TIMESTEP, device=x.device)
        tokens = (self.inp(x) + self.time(t)[:, :, None, None]).flatten(2).transpose(1, 2)
        encoding = self.task_tokens[task].expand(b, -1, -1)
        features = []
        for i, block in enumerate(self.blocks):
            tokens, residual = block(tokens, encoding, auxiliary[i] if auxiliary else None)
            features.append(residual)
        return self.out(tokens.transpose(1, 2).reshape(b, -1, h, w)), features


class StableMTL(MultiTaskModel):
    """Frozen codec + one-step latent denoiser per task with task attention to frozen auxiliary streams."""

    name = "stablemtl"
    training_procedure = ("a single-stream stage trains the denoiser, freeze_auxiliary() copies it into the "
                          "frozen auxiliary streams, and the task-attention stage trains on latent_loss()")

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: Mapping[str, int],
                 dim: int = 16, depth: int = 2, num_heads: int = 2, dense: bool = True, num_task_tokens: int = 4):
        super().__init__(tasks)
        self.out_dims, self.dense = dict(out_dims), dense
        latent = max(4, in_channels, *out_dims.values())
        self.codec = FrozenLatentCodec(latent)
        self.main = LatentDenoiser(tasks, latent, dim, depth, num_heads, num_task_tokens)
        self.auxiliary = copy.deepcopy(self.main)
        self.freeze_auxiliary()

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> StableMTL:
        if not problem.is_image:
            raise ValueError("StableMTL regresses image latents of a frozen VAE; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   dim=width, dense=problem.dense, **kwargs)

    def freeze_auxiliary(self) -> None:
        """Copy the main stream into the frozen auxiliary streams (the end of stage one)."""
        self.auxiliary.load_state_dict(self.main.state_dict())
        for p in self.auxiliary.parameters():
            p.requires_grad_(False)

    def auxiliary_features(self, image_latent: Tensor, exclude: str) -> list[dict[str, Tensor]]:
        """Per block, ``{other task: its frozen stream's features}``; no gradient flows into them."""
        per_block: list[dict[str, Tensor]] = [{} for _ in self.main.blocks]
        with torch.no_grad():
            for t in self.tasks:
                if t != exclude:
                    for i, f in enumerate(self.auxiliary(image_latent, t)[1]):
                        per_block[i][t] = f
        return per_block

    def predict_latents(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's clean latent, predicted in one step by the main stream with task attention."""
        image_latent = self.codec.encode(x)
        return {t: self.main(image_latent, t, self.auxiliary_features(image_latent, t))[0] for t in self.tasks}

    def latent_loss(self, x: Tensor, targets: Mapping[str, Tensor]) -> Tensor:
        """The unified loss: MSE between predicted and encoded target latents, over the given tasks."""
        latents = self.predict_latents(x)
        return sum((latents[t] - self.codec.encode(y)).square().mean() for t, y in targets.items()) / len(targets)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {t: self.codec.decode(z, self.out_dims[t]) for t, z in self.predict_latents(x).items()}
        return out if self.dense else {t: o.mean(dim=(2, 3)) for t, o in out.items()}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's encoding tokens in the main stream; the rest serves every task."""
        yield self.main.task_tokens[task]
