"""TSP-Transformer: a shared transformer whose later layers each see task-specific prompts.

Wang, Li, Zhao, Lian, Huang, Wang, Li, Gao, "TSP-Transformer: Task-Specific Prompts Boosted
Transformer for Holistic Scene Understanding", WACV 2024, arXiv:2311.03427.

The encoder is split in two stages. The first S layers are a vanilla transformer that
every task shares, so they learn what the tasks have in common. In each of the remaining
L - S layers a task appends its own learned prompt tokens P_t^l (P x d, a fresh set per
layer, in the manner of deep visual prompt tuning), runs the shared layer on the longer
sequence and drops the prompt positions again (official code, ``tsp_pascal.py``):

    h^l         = Layer_l(h^{l-1})                          l <= S (shared stage)
    h_t^l       = Layer_l([h_t^{l-1}; P_t^l])[:N]           l >  S (task-specific stage)

The layers stay shared, so each task gets its own features from one set of weights at
the cost of (L - S) P d parameters (tested). The layers are trained with the prompts, as in the
official code, which freezes none of the backbone. That code also has a "Shallow" insertion
mode, prompts in the *first* layers and the shared stage after them, and its PASCAL-Context
configuration uses it (its NYUD-v2 one uses the "Deep" layout above); only the Deep layout
is implemented here.
With S = L there is no prompted stage and the model is a shared-bottom transformer
(tested); in the prompted stage a task's loss reaches only its own prompts (tested).
Prompts start at zero, as in the official code, so tasks start from the same features.

Inputs become tokens with :class:`.houlsby_adapters.Tokenizer`; heads read the mean token
or predict p x p pixels per patch token for dense image tasks. The layers are the
post-LN :class:`.prefix_tuning.TransformerLayer` (the official ViT blocks are pre-LN, with a
final LayerNorm).

Left out: the pretrained ViT backbone and its [CLS] token (here a small random
transformer trained from scratch), the InvPT-style multi-scale decoder that turns each
task's features into dense predictions, the selection of intermediate layers that feed
it, and the datasets. The formulas follow the official code; the paper's equation
numbers could not be checked. The official decoder averages every task's backbone features
before mixing them, so there each task's loss also reaches the other tasks' prompts; the
isolation tested above holds because that decoder is left out (tb2-sy/TSP-Transformer).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import TransformerLayer
from .registry import Problem


class TSPTransformer(MultiTaskModel):
    """Shared early layers, then shared layers that each task runs with its own prompt tokens."""

    name = "tsp_transformer"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        shared_depth: int = 1,
        prompt_length: int = 2,
    ):
        super().__init__(tasks)
        require_non_negative(prompt_length=prompt_length)
        if not 0 <= shared_depth <= len(layers):
            raise ValueError(f"shared_depth must be in [0, {len(layers)}], got {shared_depth}")
        width = tokenizer.positions.shape[1]
        self.tokenizer, self.layers, self.shared_depth = tokenizer, layers, shared_depth
        prompted = len(layers) - shared_depth
        self.prompts = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(prompted, prompt_length, width)) for t in self.tasks}
        )  # P_t^l for l > S
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: int) -> "TSPTransformer":
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        layers = nn.ModuleList(TransformerLayer(width, num_heads) for _ in range(depth))
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def encode(self, x: Tensor) -> Tensor:
        """The shared stage: the first S layers, identical for every task."""
        h = self.tokenizer(x)
        for layer in self.layers[: self.shared_depth]:
            h = layer(h)
        return h

    def task_features(self, h: Tensor, task: str) -> Tensor:
        """The prompted stage: each layer on [h; P_t^l], prompt positions dropped afterwards."""
        for layer, prompt in zip(self.layers[self.shared_depth:], self.prompts[task]):
            h = layer(torch.cat([h, prompt.expand(h.shape[0], -1, -1)], dim=1))[:, : h.shape[1]]
        return h

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.task_features(z, t)) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.prompts[task]
        yield from self.heads[task].parameters()
