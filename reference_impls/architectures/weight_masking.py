"""Masking: per-task binary masks over a frozen pretrained transformer's weights.

Zhao, Lin, Mi, Jaggi & Schütze, "Masking as an Efficient Alternative to Finetuning for
Pretrained Language Models", EMNLP 2020, arXiv:2004.12406.

Instead of changing pretrained weights, each task *selects* a subset of them. Every
linear layer W^l of the transformer blocks gets a real-valued score matrix M^l of the same
shape, which a threshold τ turns into a binary mask; the task runs the network with
W^l ⊙ m^l (Sec. 2):

    m^l = 1[M^l > τ],    forward with W^l ⊙ m^l,    dL/dM^l := dL/dm^l (straight-through)

After training only the masks are stored: one bit per masked weight per task.

How this differs from Piggyback (:mod:`.piggyback`, Mallya et al. 2018), whose binariser
and straight-through estimator are reused here unchanged (:class:`.piggyback.ThresholdSTE`):
the mechanism is the same, but (1) the scores are drawn *uniformly at random* so that a
chosen share of the weights, the *initial sparsity*, starts masked out, whereas Piggyback
starts every score above the threshold (the backbone itself); here scores are U(0, 1) and
τ equals the initial sparsity (default 5%; 0 reproduces the backbone exactly, tested);
(2) the masks cover the attention and feed-forward matrices of a pretrained transformer
(query, key, value, output, both FFN layers), not the embeddings, layer norms or biases,
while Piggyback masks every layer of a CNN. Whether the comparison is strict makes no
difference for continuous scores.

The frozen backbone is :func:`.prefix_tuning.frozen_backbone` (post-LN); its parameters
keep ``requires_grad=False`` and the masked weights are substituted with
``torch.func.functional_call``.

Left out: the pretrained BERT/RoBERTa/DistilBERT, masking the randomly initialised
classifier (here task heads are trained normally), the choice of which top layers to mask
(here all blocks are), and the loss-landscape analysis. The code listed with the paper
(ptlmasking/maskbert) reaches the same initial sparsity another way: a fixed small
threshold (1e-2) and scores drawn from an interval around it, U(-0.02, b), with b set so
that the chosen share falls below the threshold (at 5%: U(-0.02, 0.58)); here scores are
U(0, 1) and τ = 0.05. The official code also masks the BERT pooler and allows a separate
learning rate for the masks; its threshold rule, straight-through gradient, unmasked biases
and frozen weights match (checked at 8d6d8df). The formulas are named by section, not numbered: their equation
numbers could not be checked against the text.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .piggyback import ThresholdSTE
from .prefix_tuning import frozen_backbone
from .registry import Problem


def maskable_weights(layer: nn.Module) -> dict[str, Tensor]:
    """The weight matrices of every nn.Linear in a transformer layer, by parameter name."""
    return {f"{name}.weight": m.weight for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class WeightMasking(MultiTaskModel):
    """A frozen token transformer masked per task, then one trainable head per task."""

    name = "weight_masking"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        initial_sparsity: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(tasks)
        if not 0 <= initial_sparsity < 1:
            raise ValueError(f"initial_sparsity must be in [0, 1), got {initial_sparsity}")
        self.tokenizer, self.layers = tokenizer, layers
        self.threshold = initial_sparsity  # τ; with M ~ U(0, 1), P(M < τ) = τ
        g = torch.Generator().manual_seed(seed)
        self.scores = nn.ModuleList(
            nn.ModuleDict({t: self.uniform_scores(layer, g) for t in self.tasks}) for layer in layers
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @staticmethod
    def uniform_scores(layer: nn.Module, g: torch.Generator) -> nn.ParameterDict:
        weights = maskable_weights(layer)
        return nn.ParameterDict(
            {n.replace(".", "_"): nn.Parameter(torch.rand(w.shape, generator=g).to(w)) for n, w in weights.items()}
        )

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: float) -> "WeightMasking":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def masks(self, layer_index: int, task: str) -> dict[str, Tensor]:
        """m = 1[M > τ] for each masked weight of one layer (straight-through gradient)."""
        scores = self.scores[layer_index][task]
        names = maskable_weights(self.layers[layer_index])
        return {n: ThresholdSTE.apply(scores[n.replace(".", "_")], self.threshold) for n in names}

    def masked_weights(self, layer_index: int, task: str) -> dict[str, Tensor]:
        weights = maskable_weights(self.layers[layer_index])
        return {n: weights[n] * m for n, m in self.masks(layer_index, task).items()}  # W ⊙ m

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.tokenizer(x)
        for i, layer in enumerate(self.layers):
            h = functional_call(layer, self.masked_weights(i, task), (h,), strict=False)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for per_layer in self.scores:
            yield from per_layer[task].parameters()
        yield from self.heads[task].parameters()
