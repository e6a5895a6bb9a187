"""MAD-X: stacked language and task adapters plus invertible adapters on the embeddings.

Pfeiffer, Vulić, Gurevych & Ruder, "MAD-X: An Adapter-Based Framework for Multi-Task
Cross-Lingual Transfer", EMNLP 2020, arXiv:2005.00052.

MAD-X separates *what the input looks like* from *what to do with it*. In every layer of
a frozen multilingual transformer it stacks two bottleneck adapters on the feed-forward
output h (with r the layer's residual, Sec. 3.1 and 3.2):

    LA_l(h, r) = U_l ReLU(D_l h) + r                    language adapter (one per language)
    TA_l(h, r) = U_l ReLU(D_l LA_l) + LA_l              task adapter (one per task), on top

Language adapters are trained first, one per language on its unlabelled text; a task
adapter is then trained on top of the *source* language's adapter, which stays frozen.
For zero-shot transfer the source language adapter is swapped for the target language's
and the task adapter is reused unchanged. Each language also owns an *invertible adapter*
A_lang on the token embeddings (Sec. 3.3), an additive coupling (NICE) of the two halves
e = [e_1; e_2] with small bottleneck networks F and G:

    o_1 = F(e_2) + e_1,   o_2 = G(o_1) + e_2            A(e) = [o_1; o_2]
    e_2 = o_2 - G(o_1),   e_1 = o_1 - F(e_2)            A^{-1}, exact for any F, G (tested)

The inverse is meant for the tied output embeddings of masked language modelling, so the
language-specific transformation is undone before predicting tokens.

At this scale "languages" are input *domains*: ``domains`` names them, each owns one
invertible adapter and one language adapter per layer, and :meth:`MADX.set_domain`
chooses the active one (train tasks with the source domain, then switch). Here the
residual of the adapters is the feed-forward output itself (the Houlsby-style placement
before the layer's last residual sum and layer norm), so with every up-projection at zero,
as they start, the model is the frozen backbone (tested). Domain modules are shared
across tasks and frozen unless ``train_domains=True``; task adapters and heads are the
task-specific part (tested).

The frozen backbone is :func:`.prefix_tuning.frozen_backbone` (post-LN); the invertible
adapter acts on the tokenizer's output.

MAD-X trains in stages: each domain's language and invertible adapters first (masked language
modelling on that language's text), then the task adapters on top of the frozen source
adapters. The training harness runs only the second stage: with ``train_domains=False`` the
domain adapters stay at their zero start, i.e. the identity, so it trains task adapters on
the bare backbone (``training_procedure`` says so); with ``train_domains=True`` it trains both
at once on the task losses.

Left out: the pretrained mBERT/XLM-R, masked-language-model training of the language
adapters and invertible adapters (not implemented here), the tied output embeddings that use A^{-1}, and dropout. The
formulas are named by section, not numbered: their equation numbers could not be checked
against the paper's text. Also left out, from the official code (AdapterHub, github.com/adapter-hub/adapters,
the sequential bottleneck configuration with invertible adapters): there each adapter's
down-projection reads the layer's own layer norm of the sum with the attention output,
LN(h + a) for the language adapter and LN(LA + a) for the task adapter, while h and LA stay the
residuals, and the last adapter's output goes through that layer norm with a added again;
here both read h and LA directly. Its adapters' two projections and its coupling networks
start from N(0, 0.02) with zero biases (the invertible adapters are re-initialised that way,
methods/invertible.py at 88f18eb), so neither starts exactly at the identity as the zero
up-projections here do. Its Pfeiffer configuration's bottleneck is width / 16 (width / 4 here,
which matches only its invertible adapter), and its coupling accepts odd widths (refused here).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import frozen_backbone
from .registry import Problem


class Bottleneck(nn.Module):
    """x -> U ReLU(D x), U = 0 at the start (the adapter's residual-free part)."""

    def __init__(self, in_dim: int, bottleneck: int, out_dim: int | None = None):
        super().__init__()
        self.down = nn.Linear(in_dim, bottleneck)
        self.up = nn.Linear(bottleneck, out_dim or in_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(torch.relu(self.down(x)))


class InvertibleAdapter(nn.Module):
    """Additive coupling on the halves of the last dimension: exactly invertible."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        if width % 2:
            raise ValueError(f"the invertible adapter splits the width in halves; got odd width {width}")
        half = width // 2
        self.f, self.g = Bottleneck(half, bottleneck), Bottleneck(half, bottleneck)

    def forward(self, e: Tensor) -> Tensor:
        e1, e2 = e.chunk(2, dim=-1)
        o1 = self.f(e2) + e1
        o2 = self.g(o1) + e2
        return torch.cat([o1, o2], dim=-1)

    def inverse(self, o: Tensor) -> Tensor:
        o1, o2 = o.chunk(2, dim=-1)
        e2 = o2 - self.g(o1)
        e1 = o1 - self.f(e2)
        return torch.cat([e1, e2], dim=-1)


class MADX(MultiTaskModel):
    """Frozen token transformer; per domain: invertible + language adapters; per task: task adapters."""

    name = "mad_x"
    training_procedure = ("each domain's language and invertible adapters are trained first, by masked "
                          "language modelling, then frozen under the task adapters; set_domain() swaps them")

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        domains: Sequence[str] = ("source", "target"),
        bottleneck: int | None = None,
        train_domains: bool = False,
    ):
        super().__init__(tasks)
        width = tokenizer.positions.shape[1]
        bottleneck = max(1, width // 4) if bottleneck is None else bottleneck
        require_positive(bottleneck=bottleneck)
        self.tokenizer, self.layers = tokenizer, layers
        self.domains, self.domain = tuple(domains), domains[0]
        self.invertible = nn.ModuleDict({d: InvertibleAdapter(width, bottleneck) for d in self.domains})
        self.language = nn.ModuleDict(
            {d: nn.ModuleList(Bottleneck(width, bottleneck) for _ in layers) for d in self.domains}
        )
        self.task_adapters = nn.ModuleDict(
            {t: nn.ModuleList(Bottleneck(width, bottleneck) for _ in layers) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        for p in [*self.invertible.parameters(), *self.language.parameters()]:
            p.requires_grad_(train_domains)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: object) -> "MADX":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def set_domain(self, domain: str) -> None:
        """Swap in another domain's invertible and language adapters (zero-shot transfer)."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; expected one of {self.domains}")
        self.domain = domain

    def adapted_output(self, layer_index: int, h: Tensor, task: str) -> Tensor:
        """TA(LA(h)): the task adapter stacked on the active domain's language adapter."""
        la = self.language[self.domain][layer_index](h) + h  # LA_l(h, r), r = h
        return self.task_adapters[task][layer_index](la) + la  # TA_l(h, r), r = LA_l

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.invertible[self.domain](self.tokenizer(x))
        for i, layer in enumerate(self.layers):
            a = layer.norm1(h + layer.attention(h))
            h = layer.norm2(a + self.adapted_output(i, layer.feed_forward(a), task))
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.task_adapters[task].parameters()
        yield from self.heads[task].parameters()
