"""The unified view of parameter-efficient tuning: prefix tuning as a gated adapter, plus the
scaled parallel adapter ("Mix-And-Match" adapter).

He, Zhou, Ma, Berg-Kirkpatrick & Neubig, "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR 2022, arXiv:2110.04366.

The paper recasts adapters, prefix tuning and LoRA as one recipe: a frozen sublayer
computes h, and a small learned function of the sublayer's input x adds a modification
Δh to it. Its central derivation (Sec. 3.1) splits prefix-tuned attention over
[P_k; C W_k], [P_v; C W_v] into the plain attention and an attention over the prefix
only, mixed by a gate that depends on the query:

    head = (1 - λ(x)) Attn(x W_q, C W_k, C W_v) + λ(x) Attn(x W_q, P_k, P_v)      (Eq. 7)
    λ(x) = Σ_i exp(x W_q P_k^T)_i / (Σ_i exp(x W_q P_k^T)_i + Σ_j exp(x W_q W_k^T C^T)_j)
                                                                                 (Eq. 8)

(the paper drops the 1/sqrt(d_h) score scaling for brevity; here scores are divided by it as
usual, which changes nothing in the argument). Read as an adapter, the second term is
softmax(x W_1) W_2 with W_1 = W_q P_k^T and W_2 = P_v: a bottleneck of width P, applied in
*parallel* to attention (it reads x, not h) and composed by the gate,
h ← (1 - λ) h + λ Δh (Eq. 9). :func:`prefix_as_gated_adapter` computes that form and is tested
equal to prefix-tuned attention (:class:`.prefix_tuning.Attention`).

The paper's recommended combination (Sec. 4.6, "MAM adapter") is what :class:`UnifiedPEFT`
builds per task: prefix tuning at every attention sublayer, and a *scaled parallel
adapter* at every feed-forward sublayer, reading the FFN's input x and added to its output
with a fixed scale s (s = 4 in the paper):

    h ← h + s · ReLU(x W_down) W_up                    W_down: d x r, W_up: r x d

(Table 1: the bottleneck of the adapter form, Eq. 4, with LoRA's parallel input and scaled
composition, Eq. 6).

W_up starts at zero, so the adapter begins as the identity (tested); with P = 0 prefix
tokens and W_up = 0 the model is the frozen backbone. Per task: 2 L P d prefix values plus
L (2 r d + r + d) adapter parameters plus the head (tested).

The frozen backbone is :func:`.prefix_tuning.frozen_backbone` (post-LN).

Left out: the pretrained BART/mBART/RoBERTa weights, the MLP reparameterisation of the
prefix (the prefix here is learned directly), the multi-head parallel adapter and the
other variants of the paper's design space, and dropout. Equation numbers are those of the
arXiv text (Eqs. 4 and 6-9), checked in a transcript of the paper.

Checked against the authors' code, jxhe/unify-parameter-efficient-tuning (petl/petl_factory.py,
petl/options.py, exps/run_xsum.sh and the BART layers in src/transformers/models/bart/
modeling_bart.py): there too the FFN adapter reads the post-LN attention output and its change is
added to the FFN output before the residual and the final LayerNorm. Differences: their MAM
prefix sits in every encoder self-, decoder self- and cross-attention (this backbone is an
encoder only); their adapter's down-projection bias also starts at zero (ours keeps PyTorch's
default, which changes nothing while W_up = 0); the defaults P = 4 and r = d/4 are ours, the
MAM script uses 30 prefix vectors and r = 512 on a 1024-wide BART.

Equation numbers checked in a transcript of arXiv:2110.04366, found in the public GitHub index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import Attention, TransformerLayer, frozen_backbone
from .registry import Problem


def prefix_as_gated_adapter(att: Attention, h: Tensor, prefix_keys: Tensor, prefix_values: Tensor) -> Tensor:
    """Prefix-tuned attention written as (1 - λ) plain attention + λ softmax(x W_1) W_2, per head."""
    q, k, v = att.split(att.query(h)), att.split(att.key(h)), att.split(att.value(h))
    pk = att.split(prefix_keys.expand(h.shape[0], -1, -1))
    pv = att.split(prefix_values.expand(h.shape[0], -1, -1))
    scale = math.sqrt(q.shape[-1])
    prefix_scores, token_scores = q @ pk.transpose(-1, -2) / scale, q @ k.transpose(-1, -2) / scale
    prefix_mass = torch.logsumexp(prefix_scores, dim=-1, keepdim=True)
    token_mass = torch.logsumexp(token_scores, dim=-1, keepdim=True)
    gate = torch.sigmoid(prefix_mass - token_mass)  # λ(x) = Σ exp(prefix) / (Σ exp(prefix) + Σ exp(tokens))
    plain = torch.softmax(token_scores, dim=-1) @ v  # Attn(x W_q, C W_k, C W_v)
    adapter = torch.softmax(prefix_scores, dim=-1) @ pv  # softmax(x W_1) W_2
    heads = (1 - gate) * plain + gate * adapter
    return att.out(heads.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))


class ScaledParallelAdapter(nn.Module):
    """Δh = s · ReLU(x W_down) W_up, read from the sublayer's input; W_up starts at zero."""

    def __init__(self, width: int, bottleneck: int, scale: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


class TaskModules(nn.Module):
    """One task's prefix keys/values for a layer and its FFN parallel adapter."""

    def __init__(self, width: int, prefix_length: int, bottleneck: int, scale: float):
        super().__init__()
        self.prefix_keys = nn.Parameter(torch.randn(prefix_length, width) * 0.5)  # P_k
        self.prefix_values = nn.Parameter(torch.randn(prefix_length, width) * 0.5)  # P_v
        self.adapter = ScaledParallelAdapter(width, bottleneck, scale)


def mam_layer(layer: TransformerLayer, h: Tensor, mods: TaskModules) -> Tensor:
    """Prefix tuning at attention, scaled parallel adapter at the FFN, in one frozen layer."""
    a = layer.norm1(h + layer.attention(h, mods.prefix_keys, mods.prefix_values))
    return layer.norm2(a + layer.feed_forward(a) + mods.adapter(a))


class UnifiedPEFT(MultiTaskModel):
    """A frozen token transformer; each task owns per-layer prefixes and parallel adapters."""

    name = "unified_peft"
    equations_checked_in = "a transcript of arXiv:2110.04366"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        prefix_length: int = 4,
        bottleneck: int | None = None,
        scale: float = 4.0,
    ):
        super().__init__(tasks)
        require_non_negative(prefix_length=prefix_length)
        width = tokenizer.positions.shape[1]
        bottleneck = max(1, width // 4) if bottleneck is None else bottleneck
        require_positive(bottleneck=bottleneck)
        self.tokenizer, self.layers = tokenizer, layers
        self.modules_per_task = nn.ModuleDict(
            {t: nn.ModuleList(TaskModules(width, prefix_length, bottleneck, scale) for _ in layers) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: float) -> "UnifiedPEFT":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.tokenizer(x)
        for layer, mods in zip(self.layers, self.modules_per_task[task]):
            h = mam_layer(layer, h, mods)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.modules_per_task[task].parameters()
        yield from self.heads[task].parameters()
