"""MRAN: three attention modules for three kinds of relations in tabular multi-task data.

Zhao, Du, Sun, Zhuang, Lv, Xiong. "Multiple Relational Attention Network for Multi-task
Learning", KDD 2019 (doi:10.1145/3292500.3330861).

Instead of a fixed task-relation prior, MRAN learns three relations with attention:

  feature-feature interaction   each input feature i becomes a token u_i = x_i E_i + b_i and
                                the tokens attend to each other (multi-head self-attention
                                with a residual), so features are read in context
  task-feature dependence       task t has a learned query q_t; its representation is an
                                attention-weighted sum of the feature tokens,
                                r_t = sum_i softmax_i(q_t . W_k u_i / sqrt(e)) W_v u_i,
                                i.e. every task picks the features it depends on
  task-task relationship        the task representations attend to each other,
                                r'_t = r_t + sum_j softmax_j((W_q r_t) . (W_k r_j) / sqrt(e)) W_v r_j;
                                the signed value map lets a related task push a representation
                                either way (positive or negative transfer)

and a tower per task reads r'_t. Because of the task-task module, every task's output
depends on every task's query, so the queries are shared parameters; the towers are the
task-specific ones.

Left out: the paper's exact scoring functions and normalisations of the three modules,
and its training details; this file follows the structure described in the abstract (three
attention-based modules; the abstract lists them task-task, feature-feature, task-feature,
while this file runs feature-feature, task-feature, then task-task) at small scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_each_positive, require_positive
from .base import MultiTaskModel, split_width
from .encoders import mlp_head


class MRAN(MultiTaskModel):
    """Feature tokens -> feature self-attention -> per-task feature attention -> task attention -> towers."""

    name = "mran"

    def __init__(
        self,
        tasks: Sequence[str],
        in_dim: int,
        out_dims: Mapping[str, int],
        embed_dim: int = 8,
        num_heads: int = 2,
        tower_hidden: Sequence[int] = (16,),
    ):
        super().__init__(tasks)
        require_each_positive("tower_hidden", tower_hidden)
        require_positive(embed_dim=embed_dim)
        self.field_embeddings = nn.Parameter(torch.randn(in_dim, embed_dim) / math.sqrt(embed_dim))
        self.field_biases = nn.Parameter(torch.zeros(in_dim, embed_dim))
        split_width(embed_dim, num_heads)
        self.feature_attention = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.task_queries = nn.Parameter(torch.randn(len(self.tasks), embed_dim))
        self.feature_keys = nn.Linear(embed_dim, embed_dim, bias=False)  # softmax ignores a key bias
        self.feature_values = nn.Linear(embed_dim, embed_dim)
        self.task_q = nn.Linear(embed_dim, embed_dim)
        self.task_k = nn.Linear(embed_dim, embed_dim, bias=False)
        self.task_v = nn.Linear(embed_dim, embed_dim)
        self.towers = nn.ModuleDict({t: mlp_head(embed_dim, out_dims[t], tower_hidden) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 8, **kwargs):  # noqa: ANN001, ANN206
        if len(problem.input_shape) != 1:
            raise ValueError("MRAN embeds every input feature as a token: it needs vector inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, embed_dim=width, **kwargs)

    def feature_tokens(self, x: Tensor) -> Tensor:
        """u_i = x_i E_i + b_i: (B, F, e)."""
        return x.unsqueeze(-1) * self.field_embeddings + self.field_biases

    def relations(self, x: Tensor) -> dict[str, Tensor]:
        """All intermediate quantities: tokens, the three attention maps, task representations."""
        tokens = self.feature_tokens(x)
        mixed, feature_feature = self.feature_attention(tokens, tokens, tokens, average_attn_weights=False)
        tokens = tokens + mixed  # feature-feature interaction

        scale = math.sqrt(tokens.shape[-1])
        scores = torch.einsum("te,bfe->btf", self.task_queries, self.feature_keys(tokens)) / scale
        task_feature = torch.softmax(scores, dim=-1)  # (B, T, F): which features each task reads
        reps = task_feature @ self.feature_values(tokens)  # (B, T, e)

        task_scores = self.task_q(reps) @ self.task_k(reps).transpose(1, 2) / scale
        task_task = torch.softmax(task_scores, dim=-1)  # (B, T, T)
        related = reps + task_task @ self.task_v(reps)
        return {
            "tokens": tokens,
            "feature_feature": feature_feature,
            "task_feature": task_feature,
            "task_representations": reps,
            "task_task": task_task,
            "related_representations": related,
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        related = self.relations(x)["related_representations"]
        return {t: self.towers[t](related[:, i]) for i, t in enumerate(self.tasks)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.towers[task].parameters()
