"""CIAT: per-language adapters on the embeddings and beside every sublayer of a shared translation model.

Zhu, Feng, Zhao, Wang & Li, "Counter-Interference Adapter for Multilingual Machine
Translation", Findings of EMNLP 2021, arXiv:2104.08154 (official code:
github.com/Yaoming95/CIAT, TensorFlow/NeurST).

A single multilingual model trails separately trained bilingual ones on rich-resource
language pairs; the paper blames interference between languages that share every
weight. CIAT keeps the multilingual model as it is (pre-trained on all languages, then
frozen) and gives each language direction a few parameters that undo the interference
where it arises, as in the official code. The paper writes the shared pre-LN sublayer as
x_{i+1} = sublayer(LN(x_i)) + x_i (Eq. 1) and models the multilingual sublayer as the bilingual
one plus an interference term delta_i (Eq. 2); CIAT adds

* an embedding adapter that recalibrates the shared embeddings of the input (Eq. 3),
      e' = e + E_t(e),     E_t(e) = W2 ReLU(W1 LN_t(e))
  The paper prints this correction with a minus sign, E~_f[w] = E_m[w] - G_psi(E_m[w]); since
  the adapter's output layer is free, the two signs are the same family of maps.
* a *parallel* adapter beside each sublayer (self-attention and feed-forward) of the
  pre-LN transformer, reading the same normalised input as the frozen sublayer and adding
  its correction to the sublayer's output before the residual sum; the paper has the adapter
  estimate -delta_i from the sublayer's input x_i (Eq. 4),
      h' = h + F(LN(h)) + A_t(LN(h)),     A_t(z) = W2 ReLU(W1 z)
  so the adapter corrects the frozen sublayer instead of post-processing its output, which
  is the serial design the paper contrasts in Eq. 5 (as in the serial adapters of
  :mod:`.houlsby_adapters` / :mod:`.pham2020study`).

The official code switches all adapters on or off together: in the pre-training stage the
model is the plain shared transformer, in the tuning stage every adapter term is added.
Here ``use_adapters`` is that switch; with it off, or with every adapter's output layer at
zero, the model is exactly the shared model (tested). The adapters start as the official
code's Keras ``Dense`` layers do, Glorot-uniform weights and zero biases (tested), not at
zero, so switching them on changes the model from the first step. In the official tuning
stage the final encoder and decoder layer norms stay trainable, and one model is tuned per
language pair (Yaoming95/CIAT at b07e467).

At this scale the language directions are the problem's tasks (each owns its adapters
and head) and the shared model is a pre-LN transformer encoder over the tokens of
:class:`.houlsby_adapters.Tokenizer`, with a final layer norm and ReLU feed-forward
sublayers (the official encoder's activation); bottlenecks default to half the width,
as in the official code.

Left out: the encoder-decoder translation model and its multilingual pre-training (here a
random frozen encoder), the adapters in the decoder (the encoder-decoder attention has
none in the official code), dropout, and the language tags. Neither the paper's text nor
the official code has a learned gate between the adapters, so none is implemented.
Equation numbers are those of the paper copy on the last author's site, zhu2021counter.pdf of
lileicc/lileicc.github.io (under pubs/, commit 5b540bf; a 12-page PDF built 9 Nov 2021, no
proceedings footer), which numbers Eqs. 1-5.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, feed_forward, token_heads
from .prefix_tuning import Attention
from .registry import Problem


def bottleneck(width: int, inner: int) -> nn.Sequential:
    """z -> W2 ReLU(W1 z), initialised as the official code's Keras Dense layers: Glorot-uniform
    weights, zero biases."""
    layers = nn.Sequential(nn.Linear(width, inner), nn.ReLU(), nn.Linear(inner, width))
    for layer in (layers[0], layers[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layers


class EmbeddingAdapter(nn.Module):
    """E_t(e) = W2 ReLU(W1 LN_t(e)); the caller adds it to e."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = bottleneck(width, inner)

    def forward(self, e: Tensor) -> Tensor:
        return self.mlp(self.norm(e))


class PreNormLayer(nn.Module):
    """Shared pre-LN layer h + F(LN(h)) for attention and feed-forward, with optional parallel corrections."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), Attention(width, num_heads)
        self.norm2, self.feed_forward = nn.LayerNorm(width), feed_forward(width, nn.ReLU)  # the official activation

    def forward(self, h: Tensor, adapters: nn.ModuleList | None = None) -> Tensor:
        z = self.norm1(h)
        y = self.attention(z)
        h = h + (y if adapters is None else y + adapters[0](z))  # parallel adapter on the same z
        z = self.norm2(h)
        y = self.feed_forward(z)
        return h + (y if adapters is None else y + adapters[1](z))


class CIAT(MultiTaskModel):
    """Frozen shared pre-LN transformer; per task an embedding adapter, parallel adapters and a head."""

    name = "ciat"
    equations_checked_in = "zhu2021counter.pdf of lileicc/lileicc.github.io"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        heads: Mapping[str, nn.Module],
        depth: int = 2,
        num_heads: int = 4,
        inner: int | None = None,
        freeze_backbone: bool = True,
    ):
        super().__init__(tasks)
        width = tokenizer.positions.shape[1]
        inner = max(1, width // 2) if inner is None else inner
        require_positive(inner=inner)
        self.tokenizer = tokenizer
        self.layers = nn.ModuleList(PreNormLayer(width, num_heads) for _ in range(depth))
        self.output_norm = nn.LayerNorm(width)
        self.embedding_adapters = nn.ModuleDict({t: EmbeddingAdapter(width, inner) for t in self.tasks})
        self.layer_adapters = nn.ModuleDict(
            {t: nn.ModuleList(nn.ModuleList(bottleneck(width, inner) for _ in range(2)) for _ in range(depth))
             for t in self.tasks}
        )  # [layer][0: attention, 1: feed-forward]
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.use_adapters = True
        if freeze_backbone:  # the pre-trained multilingual model
            for p in self.shared_parameters():
                p.requires_grad_(False)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_tokens: int = 10,
                     **kw: object) -> "CIAT":
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        return cls(problem.tasks, tokenizer, token_heads(problem, width, tokenizer), depth, **kw)

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.tokenizer(x)
        if self.use_adapters:
            h = h + self.embedding_adapters[task](h)  # e' = e + E_t(e)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.layer_adapters[task][i] if self.use_adapters else None)
        return self.output_norm(h)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.embedding_adapters[task].parameters()
        yield from self.layer_adapters[task].parameters()
        yield from self.heads[task].parameters()
