"""(IA)^3 from T-Few: per-task vectors that rescale keys, values and FFN activations.

Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv:2205.05638.

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations", Sec. 3.3)
adapts a frozen transformer by elementwise multiplication with three learned vectors per
layer: l_k, l_v (length d) on the attention's keys and values, and l_ff (length d_ff) on
the feed-forward block's inner activation:

    softmax(Q (l_k ⊙ K^T) / sqrt(d_h)) (l_v ⊙ V)        attention
    (l_ff ⊙ γ(W_1 x)) W_2                              feed-forward, γ the nonlinearity

All vectors start at ones, so the untrained model *is* the backbone (tested). Per task:
L (2 d + d_ff) parameters plus the head (tested). All three can be folded into the frozen
weights after training, so a task costs nothing extra at inference: l_k and l_v rescale
the rows of W_k and W_v (l ⊙ (W x + b) = diag(l) W x + diag(l) b), and l_ff, which acts
*after* γ, rescales the columns of W_2 (tested; folding it into W_1 instead would be
wrong, tested).

The frozen backbone is :func:`.prefix_tuning.frozen_backbone` (post-LN, d_ff = 2 d).

Left out: the pretrained T0 model, T-Few's training losses (unlikelihood and
length-normalised losses), the multi-task pre-training of the (IA)^3 vectors, and the
few-shot evaluation recipe. The formulas are named, not numbered: Sec. 3.3 prints them without
numbers. The numbered equations of Sec. 3 are those two losses, Eq. (1) (unlikelihood) and
Eq. (2) (length-normalised), both left out here. Equation numbers are those of arXiv:2205.05638v2.

Checked against the authors' code, r-three/t-few (src/models/lora.py, configs/ia3.json): the
vectors start at ones and multiply the outputs of the key and value projections of every
self- and cross-attention (this backbone has self-attention only) and, in the FFN, the
output of wi_1, the linear branch of T5's gated-GELU block; since that branch multiplies the
activated one, this is the same as rescaling the FFN's inner activation, which is what
l_ff does in this ungated FFN (here it folds into W_2, there into wi_1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import TransformerLayer, frozen_backbone
from .registry import Problem


class Rescaling(nn.Module):
    """l_k, l_v and l_ff for one layer and one task, all initialised to ones."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.keys = nn.Parameter(torch.ones(width))
        self.values = nn.Parameter(torch.ones(width))
        self.inner = nn.Parameter(torch.ones(inner))


def rescaled_layer(layer: TransformerLayer, h: Tensor, scale: Rescaling) -> Tensor:
    """One frozen post-LN layer with keys, values and the FFN activation rescaled."""
    att = layer.attention
    q = att.split(att.query(h))
    k = att.split(scale.keys * att.key(h))  # l_k ⊙ K
    v = att.split(scale.values * att.value(h))  # l_v ⊙ V
    a = layer.norm1(h + att.attend(q, k, v))
    w1, activation, w2 = layer.feed_forward
    return layer.norm2(a + w2(scale.inner * activation(w1(a))))  # (l_ff ⊙ γ(W_1 a)) W_2


class IA3(MultiTaskModel):
    """A frozen token transformer; each task owns (l_k, l_v, l_ff) per layer and a head."""

    name = "ia3"
    equations_checked_in = "arXiv:2205.05638v2"

    def __init__(self, tasks: Sequence[str], tokenizer: Tokenizer, layers: nn.ModuleList,
                 heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        width = tokenizer.positions.shape[1]
        inner = layers[0].feed_forward[0].out_features
        self.tokenizer, self.layers = tokenizer, layers
        self.scales = nn.ModuleDict(
            {t: nn.ModuleList(Rescaling(width, inner) for _ in layers) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10) -> "IA3":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer))

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.tokenizer(x)
        for layer, scale in zip(self.layers, self.scales[task]):
            h = rescaled_layer(layer, h, scale)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.scales[task].parameters()
        yield from self.heads[task].parameters()
