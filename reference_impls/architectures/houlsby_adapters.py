"""Houlsby adapters: bottleneck modules inside a frozen transformer, one set per task.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly,
"Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv:1902.00751.

Adapter tuning (Sec. 2) keeps the weights w of a pretrained network φ_w fixed and adds a
few new parameters v per task, chosen so that the adapted network ψ_{w,v} starts out as
φ_w; only v is trained. The adapter module (Sec. 2.1, Fig. 2) is a bottleneck with a skip
connection around it, from d features down to m << d and back:

    A(h) = h + W_up f(W_down h + b_down) + b_up        2md + d + m parameters (tested)

It is inserted twice in every transformer layer: on the output of the projection that
follows multi-head attention, and on the output of the feed-forward block, in both cases
before that sublayer's residual sum and layer norm:

    a  = LN1_t(h + A1_t(MH(h)))
    h' = LN2_t(a + A2_t(FFN(a)))

The layer norms' scale and shift are trained per task too, with the task's head (the
green boxes of Fig. 2); nothing else moves (tested). Adapter weights are drawn close to
zero (truncated normal, std 1e-3, the official code's default; biases 0), so every
adapter starts near the identity and the untrained model is the frozen transformer
(tested). f is GELU, as in the official code (which uses its tanh approximation; exact here).
Its default bottleneck is 64 (d / 4 here), and it also trains the embedding layer norm, which
the stand-in backbone here does not have (google-research/adapter-bert at 1a31fc6).

Inputs are turned into token sequences: a vector of d features is cut into ``num_tokens``
contiguous chunks (zero-padded at the end), each embedded by one linear map; an image
into p x p patches. Task outputs: the mean token through a linear map, or, for dense
image tasks, each patch token predicting its own p x p pixels. These helpers are reused
by :mod:`.pals`.

Left out: the pretrained BERT weights (the backbone here is a random frozen transformer
with learned position embeddings), dropout, [CLS]-token pooling, and the per-task search
over adapter size and learning rate.

The paper describes the adapter in words and in Fig. 2 (Sec. 2.1, which also gives the
2md + d + m count), with no numbered equation there; the two formulas above are our notation.
This was checked against a copy of the paper's text whose version header was not preserved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel, split_width
from .registry import Problem


def patch_size_for(height: int, width: int) -> int:
    """The largest patch size in (4, 2, 1) that tiles the image into at least 4 patches."""
    sizes = [p for p in (4, 2, 1) if height % p == width % p == 0 and (height // p) * (width // p) >= 4]
    if not sizes:
        raise ValueError(f"a {height}x{width} image is too small to cut into at least 4 patches")
    return sizes[0]


class Tokenizer(nn.Module):
    """(B, d) or (B, C, H, W) -> (B, N, width) tokens, plus a learned position embedding."""

    def __init__(self, input_shape: Sequence[int], width: int, num_tokens: int = 10):
        super().__init__()
        require_positive(num_tokens=num_tokens)
        if len(input_shape) == 1:
            self.chunk = math.ceil(input_shape[0] / num_tokens)  # features per token
            self.length = math.ceil(input_shape[0] / self.chunk)
            self.embed: nn.Module = nn.Linear(self.chunk, width)
            self.patch, self.grid = 1, None
        elif len(input_shape) == 3:
            self.patch = patch_size_for(*input_shape[1:])
            self.grid = (input_shape[1] // self.patch, input_shape[2] // self.patch)
            self.length = self.grid[0] * self.grid[1]
            self.embed = nn.Conv2d(input_shape[0], width, self.patch, stride=self.patch)
        else:
            raise ValueError(f"expected an input shape (d,) or (C, H, W), got {tuple(input_shape)}")
        self.positions = nn.Parameter(torch.randn(self.length, width) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = F.pad(x, (0, self.chunk * self.length - x.shape[1]))
            tokens = self.embed(x.view(x.shape[0], self.length, self.chunk))
        else:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
        return tokens + self.positions


class TokenHead(nn.Module):
    """A task's output from tokens: linear on their mean, or p x p pixels per patch token."""

    def __init__(self, width: int, out_dim: int, tokenizer: Tokenizer, dense: bool):
        super().__init__()
        self.dense = dense and tokenizer.grid is not None
        self.patch, self.grid = tokenizer.patch, tokenizer.grid
        self.linear = nn.Linear(width, out_dim * self.patch**2 if self.dense else out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        if not self.dense:
            return self.linear(tokens.mean(dim=1))
        y = self.linear(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return F.pixel_shuffle(y, self.patch)  # (B, out * p^2, H/p, W/p) -> (B, out, H, W)


def token_heads(problem: Problem, width: int, tokenizer: Tokenizer) -> dict[str, TokenHead]:
    return {t: TokenHead(width, d, tokenizer, problem.dense) for t, d in problem.task_out_dims.items()}


def feed_forward(width: int, activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), activation(), nn.Linear(2 * width, width))


class Adapter(nn.Module):
    """A(h) = h + W_up f(W_down h + b_down) + b_up, initialised near the identity."""

    def __init__(self, dim: int, bottleneck: int, init_scale: float = 1e-3):
        super().__init__()
        require_above(0, init_scale=init_scale)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
            nn.init.zeros_(linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))


class AdaptedTransformerLayer(nn.Module):
    """Post-LN transformer layer (shared) with per-task adapters and layer norms."""

    def __init__(self, width: int, num_heads: int, tasks: Sequence[str], bottleneck: int, init_scale: float):
        super().__init__()
        split_width(width, num_heads)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)  # MH, incl. its projection
        self.feed_forward = feed_forward(width)
        self.attention_adapters = nn.ModuleDict({t: Adapter(width, bottleneck, init_scale) for t in tasks})
        self.feed_forward_adapters = nn.ModuleDict({t: Adapter(width, bottleneck, init_scale) for t in tasks})
        self.attention_norms = nn.ModuleDict({t: nn.LayerNorm(width) for t in tasks})
        self.feed_forward_norms = nn.ModuleDict({t: nn.LayerNorm(width) for t in tasks})

    def forward(self, h: Tensor, task: str) -> Tensor:
        attended = self.attention(h, h, h, need_weights=False)[0]
        a = self.attention_norms[task](h + self.attention_adapters[task](attended))
        return self.feed_forward_norms[task](a + self.feed_forward_adapters[task](self.feed_forward(a)))


class HoulsbyAdapters(MultiTaskModel):
    """A frozen token transformer; each task adds adapters, layer norms and a head."""

    name = "houlsby_adapters"
    equations_checked_in = "a copy of the paper's text whose version header was not preserved"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        heads: Mapping[str, nn.Module],
        width: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        bottleneck: int | None = None,
        init_scale: float = 1e-3,
        freeze_backbone: bool = True,
    ):
        super().__init__(tasks)
        bottleneck = max(1, width // 4) if bottleneck is None else bottleneck
        require_positive(bottleneck=bottleneck)
        self.tokenizer = tokenizer
        self.layers = nn.ModuleList(
            AdaptedTransformerLayer(width, num_heads, self.tasks, bottleneck, init_scale) for _ in range(depth)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        if freeze_backbone:  # the "pretrained" weights w: tokenizer, attention, feed-forward
            for p in self.shared_parameters():
                p.requires_grad_(False)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_tokens: int = 10,
                     **kw: object) -> "HoulsbyAdapters":
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        return cls(problem.tasks, tokenizer, token_heads(problem, width, tokenizer), width, depth, **kw)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.tokenizer(x)
        outputs = {}
        for t in self.tasks:
            h = tokens
            for layer in self.layers:
                h = layer(h, t)
            outputs[t] = self.heads[t](h)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            for part in (layer.attention_adapters, layer.feed_forward_adapters,
                         layer.attention_norms, layer.feed_forward_norms):
                yield from part[task].parameters()
        yield from self.heads[task].parameters()
