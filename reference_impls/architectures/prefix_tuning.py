"""Prefix-tuning: a frozen transformer steered by per-task key/value prefixes at every layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021,
arXiv:2101.00190.

The pretrained transformer is never trained. Each task owns a short sequence of P
continuous "virtual tokens" whose activations are free parameters at *every* layer
(Sec. 4.2, Eq. 3): at layer l, attention runs over the P prefix positions followed by the
real tokens, and only the real tokens produce queries and outputs. With the per-layer prefix
written as keys K^p_l and values V^p_l (each P x d, before the head split):

    head_i = softmax(q_i [K^p_l; K_l]^T / sqrt(d_h)) [V^p_l; V_l]        (per head i)

Optimising the prefix directly was unstable in the paper, so it is reparameterised
through a feed-forward network (Sec. 4.3): a smaller matrix P' (P x d') is mapped by an
MLP to all layers' keys and values, P_θ[i, :] = MLP_θ(P'_θ[i, :]) (inline in the paper,
unnumbered), with one hidden layer of width m and a tanh (tested). Only P' and the MLP are
trained; once training ends the MLP's output is all that is kept
(:meth:`PrefixTuning.export_prefixes`, after which the MLP can be dropped, tested). Per task: P d' + (d' m + m) + (m · 2 L d + 2 L d) parameters for hidden width m
(tested); the exported prefix itself has 2 L P d (tested).

The frozen backbone is a post-LN transformer over the tokens of
:class:`.houlsby_adapters.Tokenizer`, with explicit query/key/value maps so that keys and
values can be extended or rescaled. This module also provides that backbone
(:class:`Attention`, :class:`TransformerLayer`, :func:`frozen_backbone`) to the other
parameter-efficient methods (prompt tuning, (IA)^3, AdapterFusion, MAD-X, weight masking,
the unified view). Task heads read the mean token, or predict p x p pixels per patch token
for dense image tasks.

Left out: the pretrained GPT-2/BART weights (here a random frozen transformer), the
autoregressive decoding setting and its causal mask, prefix initialisation from real
words, and dropout. The defaults d' = d/2 and m = 2d are ours; the authors' code uses
d' = d (P' is an embedding table of the model width) and m = 512 (XiangLi1999/PrefixTuning at
6519d30), while the paper's footnote 4 makes P' of width k = 512 (800 for summarisation),
mapped by the MLP to the model width. Eq. 3 of the paper
states the free prefix activations; the attention form above is our per-layer reading of
it, not a formula of the paper.

Equation numbers checked in a text copy of the ACL 2021 paper, found in the public GitHub index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer, feed_forward, token_heads
from .registry import Problem


class Attention(nn.Module):
    """Multi-head self-attention with explicit W_q, W_k, W_v, W_o and optional extra keys/values."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        split_width(width, num_heads)
        self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)
        self.value, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.num_heads = num_heads

    def split(self, z: Tensor) -> Tensor:
        """(B, N, d) -> (B, heads, N, d / heads)."""
        return z.view(*z.shape[:2], self.num_heads, z.shape[-1] // self.num_heads).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d_h)) v per head, then heads concatenated and W_o."""
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = weights @ v
        return self.out(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))

    def forward(self, h: Tensor, prefix_keys: Tensor | None = None, prefix_values: Tensor | None = None) -> Tensor:
        q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
        if prefix_keys is not None:  # (P, d): the same virtual tokens for every example
            batch = (h.shape[0], -1, -1)
            k = torch.cat([self.split(prefix_keys.expand(*batch)), k], dim=2)
            v = torch.cat([self.split(prefix_values.expand(*batch)), v], dim=2)
        return self.attend(q, k, v)


class TransformerLayer(nn.Module):
    """Post-LN layer: a = LN1(h + MH(h)), h' = LN2(a + FFN(a)); MH may take a prefix."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.attention = Attention(width, num_heads)
        self.norm1 = nn.LayerNorm(width)
        self.feed_forward = feed_forward(width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, h: Tensor, prefix_keys: Tensor | None = None, prefix_values: Tensor | None = None) -> Tensor:
        a = self.norm1(h + self.attention(h, prefix_keys, prefix_values))
        return self.norm2(a + self.feed_forward(a))


def frozen_backbone(input_shape: Sequence[int], width: int, depth: int, num_heads: int,
                    num_tokens: int) -> tuple[Tokenizer, nn.ModuleList]:
    """A tokenizer and ``depth`` transformer layers, all with ``requires_grad=False``."""
    require_positive(depth=depth)
    tokenizer = Tokenizer(input_shape, width, num_tokens)
    layers = nn.ModuleList(TransformerLayer(width, num_heads) for _ in range(depth))
    for p in [*tokenizer.parameters(), *layers.parameters()]:
        p.requires_grad_(False)
    return tokenizer, layers


class PrefixGenerator(nn.Module):
    """P' (P x d') through an MLP to every layer's prefix keys and values."""

    def __init__(self, length: int, width: int, depth: int, small: int, hidden: int):
        super().__init__()
        self.small = nn.Parameter(torch.randn(length, small))  # P'
        self.mlp = nn.Sequential(nn.Linear(small, hidden), nn.Tanh(), nn.Linear(hidden, 2 * depth * width))
        self.depth, self.width = depth, width

    def forward(self) -> Tensor:
        """(L, 2, P, d): keys [:, 0] and values [:, 1] for each layer."""
        out = self.mlp(self.small)  # P_θ[i, :] = MLP_θ(P'_θ[i, :])
        return out.view(-1, self.depth, 2, self.width).permute(1, 2, 0, 3)


class PrefixTuning(MultiTaskModel):
    """A frozen token transformer; each task owns a prefix generator and a head."""

    name = "prefix_tuning"
    equations_checked_in = "a text copy of the ACL 2021 paper"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        prefix_length: int = 4,
        small: int | None = None,
        hidden: int | None = None,
    ):
        super().__init__(tasks)
        require_non_negative(prefix_length=prefix_length)
        width = tokenizer.positions.shape[1]
        small = max(1, width // 2) if small is None else small
        hidden = 2 * width if hidden is None else hidden
        require_positive(hidden=hidden, small=small)
        self.tokenizer, self.layers = tokenizer, layers
        self.prefixes = nn.ModuleDict(
            {t: PrefixGenerator(prefix_length, width, len(layers), small, hidden) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        for i in range(len(self.tasks)):  # filled by export_prefixes (named by index: names may hold dots)
            self.register_buffer(f"exported_{i}", torch.empty(0))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: int) -> "PrefixTuning":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def prefix(self, task: str) -> Tensor:
        """(L, 2, P, d): the exported prefix if there is one, else the MLP's current output."""
        exported = getattr(self, f"exported_{self.tasks.index(task)}")
        return self.prefixes[task]() if exported.numel() == 0 else exported

    def export_prefixes(self) -> None:
        """Keep only the MLP's output (the prefix itself) for inference, as the paper does.

        Stored in buffers, so the prefixes follow ``.to()`` / ``.double()`` and are saved in
        the state dict.
        """
        for i, t in enumerate(self.tasks):
            setattr(self, f"exported_{i}", self.prefixes[t]().detach().clone())

    def features(self, x: Tensor, task: str) -> Tensor:
        h, prefix = self.tokenizer(x), self.prefix(task)
        for layer, (keys, values) in zip(self.layers, prefix):
            h = layer(h, keys, values)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.prefixes[task].parameters()
        yield from self.heads[task].parameters()
