"""CARE: a mixture of shared encoders, mixed by attention computed from a task's context.

Sodhani, Zhang & Pineau, "Multi-Task Reinforcement Learning with Context-based
Representations", ICML 2021, arXiv:2102.06177.

Every task has metadata (in the paper a sentence describing the Meta-World task,
embedded by a frozen pretrained language model). A small feed-forward context encoder
turns it into a context vector, which sets how much each of ``k`` shared encoders
contributes to that task's representation; the paper's Fig. 3:

    z_context = g(metadata_t)                       context encoder
    alpha     = softmax(A z_context / temperature)  one weight per encoder, sums to 1
    z_enc     = sum_i alpha_i E_i(x)                mixture of the k encoders
    z_s       = [z_enc, z_context]                  what the task's policy / head reads

Tasks with similar metadata get similar mixtures (identical metadata, identical
mixture; tested), so related tasks share encoders and the context decides which
representations to compose. The weights depend on the task only, not on the input: a
context-conditioned mixture, not a per-example gate as in MMoE.

``metadata`` may be given as a fixed ``T x m`` matrix (a buffer, e.g. sentence
embeddings); without it every task gets a learned ``m``-vector, which makes the
context a learned task embedding. For images the context is broadcast over space
before it is concatenated.

Left out: the reinforcement-learning agent (SAC, Meta-World), the pretrained language
model, and the official code's optional top-k hard attention; the attention map ``A``
here is one linear layer (a 3-layer MLP in the official CARE configuration, whose context
encoder is deeper and applies a ReLU to the raw sentence embedding, and whose policy is one
network for all tasks, not per-task heads; facebookresearch/mtrl at e282c3f).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def broadcast_like(context: Tensor, features: Tensor) -> Tensor:
    """A ``(c,)`` vector expanded to ``(B, c)`` or ``(B, c, H, W)`` to sit beside ``features``."""
    shape = (features.shape[0], context.shape[0], *features.shape[2:])
    return context.view(1, -1, *([1] * (features.ndim - 2))).expand(shape)


class CARE(MultiTaskModel):
    """``num_encoders`` shared encoders, a context encoder, an attention map and a head per task."""

    name = "care"

    def __init__(
        self,
        tasks: Sequence[str],
        make_encoder: Callable[[], nn.Module],
        num_encoders: int,
        heads: Mapping[str, nn.Module],
        context_dim: int = 8,
        metadata: Tensor | None = None,
        metadata_dim: int = 8,
        temperature: float = 1.0,
    ):
        super().__init__(tasks)
        require_above(0, temperature=temperature)
        require_positive(context_dim=context_dim, metadata_dim=metadata_dim, num_encoders=num_encoders)
        self.encoders = nn.ModuleList(make_encoder() for _ in range(num_encoders))
        if metadata is None:  # learned task embeddings stand in for the descriptions
            self.learned_metadata = nn.ParameterDict({t: nn.Parameter(torch.randn(metadata_dim)) for t in self.tasks})
        else:
            if metadata.shape[0] != len(self.tasks):
                raise ValueError(f"metadata needs one row per task ({len(self.tasks)}), got {metadata.shape[0]}")
            self.learned_metadata = None
            self.register_buffer("metadata", metadata.detach().clone().float())
            metadata_dim = metadata.shape[1]
        self.context_encoder = nn.Sequential(
            nn.Linear(metadata_dim, context_dim), nn.ReLU(), nn.Linear(context_dim, context_dim)
        )
        self.attention = nn.Linear(context_dim, num_encoders)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.temperature = temperature

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 1, num_encoders: int = 4,
                     context_dim: int = 8, **kw: object) -> "CARE":
        heads = heads_for(problem, width + context_dim)  # heads read [z_enc, z_context]
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth), num_encoders,
                   heads, context_dim, **kw)

    def task_metadata(self, task: str) -> Tensor:
        if self.learned_metadata is not None:
            return self.learned_metadata[task]
        return self.metadata[self.tasks.index(task)]

    def context(self, task: str) -> Tensor:
        return self.context_encoder(self.task_metadata(task))  # z_context, (c,)

    def attention_weights(self, task: str) -> Tensor:
        return torch.softmax(self.attention(self.context(task)) / self.temperature, dim=-1)  # alpha, (k,)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        encodings = torch.stack([encoder(x) for encoder in self.encoders])  # (k, B, ...), shared
        outputs = {}
        for t in self.tasks:
            z_enc = torch.einsum("k,kb...->b...", self.attention_weights(t), encodings)
            z_s = torch.cat([z_enc, broadcast_like(self.context(t), z_enc)], dim=1)
            outputs[t] = self.heads[t](z_s)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if self.learned_metadata is not None:
            yield self.learned_metadata[task]
        yield from self.heads[task].parameters()
