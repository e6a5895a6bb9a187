"""OmniNet: peripherals fill a spatial and a temporal cache, one decoder serves every task.

Pramanik, Agrawal, Hussain. "OmniNet: A unified architecture for multi-modal multi-task
learning", arXiv 2019 (arXiv:1907.07804). The structure below follows the authors' official
PyTorch code (github.com/subho406/OmniNet: ``libs/omninet/cnp/cnp.py``, ``cnp/Layers.py``,
``cnp/SubLayers.py``, ``peripherals.py``, ``routines.py``); no equation numbers are cited.

Every input domain has a small *peripheral* that turns it into a tensor of shape
(B, t, s, d): t time steps (words, video frames) of s spatial features (image regions;
s = 1 for text). A single Central Neural Processor (CNP) then does everything else:

    encode   each input is concatenated with its domain's control embedding and projected;
             if s > 1 its t*s features are appended to the *spatial cache*; its features
             averaged over s go through a transformer encoder and are appended to the
             *temporal cache*. Several inputs (an image and a question) share the caches.
    decode   the first decoder token is the task's control embedding (the task is named by
             this token only); every decoder layer runs
                 causal self-attention over the decoder tokens,
                 attention over the temporal cache, whose weights a_h(i) per head h and
                 cached time step i are kept,
                 *gated* attention over the spatial cache: a key at time step i has its
                 scaled score multiplied by a_h(i) before the softmax,
                     softmax_k( a_h(frame(k)) * q.k / sqrt(d_k) ),
                 a position-wise feed-forward block,
             each sublayer post-LN with its residual (the spatial and temporal sublayers
             work at their caches' widths, with linear maps in between).
    output   a task-specific classifier on the decoder state. A classification task (the
             paper's HMDB, VQA) answers from the first position, the control token's;
             a sequence task (captions, POS tags) is decoded autoregressively, the task's own
             output embedding feeding its previous answer back.

The tasks share everything except their classifier and output embedding. Here the problem's
input is one domain: an image is one frame of s patch features (the spatial cache holds the
patches, the temporal cache their mean: one step); a vector is a sequence of t feature chunks
with s = 1, like a sentence (no spatial cache, so no spatial attention is built). ``forward``
answers every task in one decoding step, as OmniNet's classification tasks do;
:meth:`OmniNet.decode_task` with targets is teacher-forced sequence decoding, and
:meth:`OmniNet.fill_caches` takes several inputs or frames.

Frame pairing of the gate: we gate every spatial key by the temporal weight of the frame it
came from. The official code builds the gate in the order (spatial position, frame) while the
spatial cache is stored in the order (frame, spatial position), so for inputs with several
frames *and* several regions (HMDB videos) it pairs key k with frame k mod t instead; for a
single image or for text the two agree. The gate is not detached (nor is it in the official
code): the spatial attention's loss also reaches the temporal attention through it.

Left out: the pretrained peripherals (a frozen ResNet-152 for images and video frames,
BPEmb subword embeddings for text; here a linear patch or chunk embedding with learned
positions), padding masks, the recurrent passes over the encoder and decoder
(``recurrent_steps``, 1 in the released configurations), dropout, the original weight
initialisation, asynchronous multi-GPU (hogwild) training across tasks, and beam search. Its
attention uses 64 dimensions per head whatever the width, and 4x wide feed-forward layers (the
width split across heads and 2x here).
Choice of ours: the key projections have no bias (a key bias adds the same amount to all of a
query's scores, which the softmax removes; under the spatial gate it would not quite).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer
from .registry import Problem


def sinusoid_positions(length: int, dim: int, like: Tensor) -> Tensor:
    """The Transformer's sine/cosine table for positions 1..length (0 is OmniNet's padding)."""
    position = torch.arange(1, length + 1, device=like.device, dtype=like.dtype)[:, None]
    rate = 10000 ** (-2 * (torch.arange(dim, device=like.device, dtype=like.dtype) // 2) / dim)
    angles = position * rate
    return torch.where(torch.arange(dim, device=like.device) % 2 == 0, angles.sin(), angles.cos())


class GatedAttention(nn.Module):
    """Post-LN multi-head attention LN(q + W_o softmax(gate * QK^T / sqrt(d_k)) V).

    ``gate`` (B, heads, Nq, Nk) multiplies the scaled scores (the CNP's spatial attention);
    without it this is ordinary attention. Returns the output and the weights.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, split_width(dim, num_heads)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None,
                gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(memory)), self._heads(self.value(memory))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if gate is not None:
            scores = scores * gate
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.out(mixed)), weights


class FeedForward(nn.Module):
    """Post-LN position-wise block LN(x + W_2 ReLU(W_1 x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


class EncoderLayer(nn.Module):
    """The temporal encoder's layer: self-attention, then the feed-forward block."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention, self.feed_forward = GatedAttention(dim, num_heads), FeedForward(dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.feed_forward(self.attention(h, h)[0])


@dataclass
class Caches:
    """What the CNP keeps of its inputs: temporal features, spatial features and, per input,
    (t, s), so each spatial feature can be traced to the time step it came from."""

    temporal: Tensor
    spatial: Tensor | None = None
    links: list[tuple[int, int]] = field(default_factory=list)


def spatial_gate(temporal_weights: Tensor, links: Sequence[tuple[int, int]]) -> Tensor:
    """Temporal weights (B, h, Nq, sum t) -> a gate (B, h, Nq, sum of t*s over inputs with s > 1).

    Every spatial feature of time step i of an input gets that step's temporal weight; inputs
    without spatial features (s = 1) occupy temporal steps only.
    """
    pieces, start = [], 0
    for t, s in links:
        if s > 1:
            pieces.append(temporal_weights[..., start:start + t].repeat_interleave(s, dim=-1))
        start += t
    return torch.cat(pieces, dim=-1)


class DecoderLayer(nn.Module):
    """Self-attention, temporal-cache attention, gated spatial-cache attention, feed-forward."""

    def __init__(self, dim: int, num_heads: int, spatial: bool):
        super().__init__()
        self.self_attention = GatedAttention(dim, num_heads)
        self.to_temporal = nn.Linear(dim, dim)  # decoder width -> temporal cache width
        self.temporal_attention = GatedAttention(dim, num_heads)
        self.to_spatial = nn.Linear(dim, dim)  # temporal -> spatial cache width
        self.spatial_attention = GatedAttention(dim, num_heads) if spatial else None
        self.to_decoder = nn.Linear(dim, dim)
        self.feed_forward = FeedForward(dim)

    def forward(self, h: Tensor, caches: Caches, causal: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """New states, the temporal attention weights, and the spatial ones (or None)."""
        h, _ = self.self_attention(h, h, causal)
        h, temporal_weights = self.temporal_attention(self.to_temporal(h), caches.temporal)
        h, spatial_weights = self.to_spatial(h), None
        if caches.spatial is not None:
            gate = spatial_gate(temporal_weights, caches.links)
            h, spatial_weights = self.spatial_attention(h, caches.spatial, gate=gate)
        return self.feed_forward(self.to_decoder(h)), temporal_weights, spatial_weights


class OmniNet(MultiTaskModel):
    """Peripherals -> spatial/temporal caches -> one task-prompted decoder -> task classifiers."""

    name = "omninet"
    training_procedure = ("tasks are trained asynchronously, each batch from one task's data, and sequence "
                          "tasks by teacher-forced decode_task() with token cross-entropy")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dim: int = 32,
        control_dim: int = 8,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        num_heads: int = 2,
        num_tokens: int = 6,
    ):
        super().__init__(tasks)
        require_positive(dim=dim, control_dim=control_dim, encoder_depth=encoder_depth,
                         decoder_depth=decoder_depth)
        self.out_dims = {t: out_dims.get(t, 1) for t in self.tasks}
        self.image = len(input_shape) == 3
        self.domain = "IMAGE" if self.image else "SEQUENCE"
        self.peripheral = Tokenizer(input_shape, dim, num_tokens)  # the pretrained encoders' stand-in
        # Control states: the input domain, then one per task.
        self.controls = {c: i for i, c in enumerate([self.domain, *self.tasks])}
        self.control = nn.Embedding(len(self.controls), control_dim)
        self.input_proj = nn.Linear(dim + control_dim, dim)
        self.spatial_proj = nn.Linear(dim, dim) if self.image else None
        self.temporal_proj = nn.Linear(dim, dim)
        self.temporal_encoder = nn.ModuleList(EncoderLayer(dim, num_heads) for _ in range(encoder_depth))
        self.control_to_decoder = nn.Linear(control_dim, dim)
        self.decoder = nn.ModuleList(DecoderLayer(dim, num_heads, self.image) for _ in range(decoder_depth))
        self.decoder_out = nn.Linear(dim, dim)
        self.classifiers = nn.ModuleDict({t: nn.Linear(dim, d) for t, d in self.out_dims.items()})
        self.output_embeddings = nn.ModuleDict({t: nn.Embedding(d, dim) for t, d in self.out_dims.items()})
        self.embedding_to_decoder = nn.Linear(dim, dim)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "OmniNet":
        if problem.dense:
            raise ValueError("OmniNet answers with class scores or tokens: dense problems are not supported")
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dim=width, **kw)

    # ----- peripherals and the caches -----------------------------------------------------

    def frames(self, x: Tensor) -> Tensor:
        """The peripheral's (B, t, s, dim): an image is 1 frame of patches, a vector t chunks."""
        tokens = self.peripheral(x)
        return tokens[:, None] if self.image else tokens[:, :, None]

    def control_vector(self, state: str, batch: int, like: Tensor) -> Tensor:
        index = torch.full((batch,), self.controls[state], dtype=torch.long, device=like.device)
        return self.control(index)

    def fill_caches(self, inputs: Sequence[Tensor]) -> Caches:
        """Encode each (B, t, s, dim) input of this model's domain into the shared caches."""
        temporal, spatial, links = [], [], []
        for frames in inputs:
            b, t, s, _ = frames.shape
            if s > 1 and self.spatial_proj is None:
                raise ValueError("this model was built without spatial attention: inputs must have s = 1")
            control = self.control_vector(self.domain, b, frames)[:, None, None].expand(b, t, s, -1)
            h = self.input_proj(torch.cat([frames, control], dim=-1))
            if s > 1:
                spatial.append(self.spatial_proj(h.reshape(b, t * s, -1)))  # ordered (frame, position)
            steps = self.temporal_proj(h.mean(dim=2))
            steps = steps + sinusoid_positions(t, steps.shape[-1], steps)
            for layer in self.temporal_encoder:
                steps = layer(steps)
            temporal.append(steps)
            links.append((t, s))
        return Caches(torch.cat(temporal, dim=1), torch.cat(spatial, dim=1) if spatial else None, links)

    # ----- decoding -----------------------------------------------------------------------

    def decoder_states(self, inputs: Tensor, caches: Caches) -> tuple[Tensor, list[tuple[Tensor, Tensor | None]]]:
        """Causal decoding of (B, L, dim) inputs: states (B, L, dim) and each layer's
        (temporal, spatial) attention weights."""
        length = inputs.shape[1]
        h = inputs + sinusoid_positions(length, inputs.shape[-1], inputs)
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        weights = []
        for layer in self.decoder:
            h, temporal_weights, spatial_weights = layer(h, caches, causal)
            weights.append((temporal_weights, spatial_weights))
        return self.decoder_out(h), weights

    def decode_task(self, caches: Caches, task: str, targets: Tensor | None = None) -> Tensor:
        """Task scores (B, L, out_dims[task]) for [control token; targets[:, :-1]] as inputs.

        Position 0 reads the task's control token only, so without targets this is the
        one-step answer of a classification task; with targets (B, L) it is teacher forcing.
        """
        batch = caches.temporal.shape[0]
        inputs = self.control_to_decoder(self.control_vector(task, batch, caches.temporal))[:, None]
        if targets is not None and targets.shape[1] > 1:
            answers = self.embedding_to_decoder(self.output_embeddings[task](targets[:, :-1]))
            inputs = torch.cat([inputs, answers], dim=1)
        states, _ = self.decoder_states(inputs, caches)
        return self.classifiers[task](states)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        caches = self.fill_caches([self.frames(x)])
        return {t: self.decode_task(caches, t)[:, 0] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's classifier and output embedding; its control embedding is a row of the
        shared table."""
        yield from self.classifiers[task].parameters()
        yield from self.output_embeddings[task].parameters()
