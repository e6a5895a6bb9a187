"""Residual adapters for multi-domain NMT: a frozen generic model, one small adapter per domain and layer.

Pham, Crego, Yvon & Senellart, "A Study of Residual Adapters for Multi-Domain Neural
Machine Translation", WMT 2020 (Proceedings of the Fifth Conference on Machine
Translation, pp. 617-628).

A generic translation model is first trained on the mixture of all domains and then
frozen. Each domain d adds one residual adapter behind every layer i of that model, in the
form of Bapna & Firat (EMNLP 2019): layer-normalise the layer's output h_i, project it down
to a bottleneck, ReLU, project back up, and add the result to h_i (Sec. 2.1.1, where the
five steps are displayed without an equation number),

    ĥ_i = h_i + W_up,d ReLU(W_down,d LN_d(h_i))            2 b d + b + 3 d parameters (tested)

The adapted output ĥ_i is what layer i + 1 reads. Only the adapters of the sentence's
domain are used, so training on domain d moves only domain d's adapters (tested) and
the generic model stays intact for every other domain. The up projection starts at zero
(our choice, so that each adapter starts as the identity and the untrained model is the
generic one, tested).

At this scale the domains are the problem's tasks: each task owns its adapters and head,
and the frozen generic model is the transformer of :func:`.prefix_tuning.frozen_backbone`
over the tokens of :class:`.houlsby_adapters.Tokenizer`.

Left out: the encoder-decoder Transformer and its pretraining on the generic corpus (here
a random frozen encoder-only transformer), the paper's two variants and its regularisation
of the adapters (weight decay or a penalty on the adapter outputs, both displayed unnumbered
in Sec. 2.1.2), and dropout. The variants keep one adapter per layer but add all of their
outputs to the top layer only, "highway" adapters

    h̄^L = h^L + sum_{1 <= i <= L} ADAP^i(h^i)                                  (Eq. 1)

and the same sum with each term scaled per token by a domain classifier's posterior z_k,
"gated" adapters (Eq. 2). The first author's multi-domain translation code (qmpham/DAFE at
85a1c0c; it does not name this paper, so it may not be the exact code behind it) matches the
placement, residual path and per-domain selection, but shares one input layer norm per layer
across domains (one per domain here), starts the adapters from Glorot-uniform weights rather
than a zero up-projection, adds a layer norm inside the bottleneck, penalises the adapter
outputs, and is pre-norm (post-norm here). Equation and section numbers are those of the
camera-ready LaTeX source in the first author's repository (2020/wmt_20/mdadapt.tex of
qmpham/papers, last changed in commit a798464 "final version", 2020-10-13; read in the
snapshot 2550908); the numbers were counted from its numbered equation environments, not
read off a printed copy. That source does not state how the adapters are initialised.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .mad_x import Bottleneck
from .prefix_tuning import frozen_backbone
from .registry import Problem


class ResidualAdapter(nn.Module):
    """h + W_up ReLU(W_down LN(h)); the identity while W_up = 0."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.bottleneck = Bottleneck(width, bottleneck)  # down, ReLU, up (zero-initialised)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.bottleneck(self.norm(h))


class DomainResidualAdapters(MultiTaskModel):
    """A frozen generic transformer; each domain (task) owns an adapter after every layer and a head."""

    name = "pham2020study"
    equations_checked_in = "2020/wmt_20/mdadapt.tex of qmpham/papers"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        bottleneck: int | None = None,
    ):
        super().__init__(tasks)
        width = tokenizer.positions.shape[1]
        bottleneck = max(1, width // 4) if bottleneck is None else bottleneck
        require_positive(bottleneck=bottleneck)
        self.tokenizer, self.layers = tokenizer, layers
        self.adapters = nn.ModuleDict(
            {t: nn.ModuleList(ResidualAdapter(width, bottleneck) for _ in layers) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: int) -> "DomainResidualAdapters":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def features(self, x: Tensor, domain: str) -> Tensor:
        h = self.tokenizer(x)
        for layer, adapter in zip(self.layers, self.adapters[domain]):
            h = adapter(layer(h))  # ĥ_i = ADAP_d(h_i), read by layer i + 1
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.adapters[task].parameters()
        yield from self.heads[task].parameters()
