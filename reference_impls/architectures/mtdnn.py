"""MT-DNN: one shared transformer encoder, one small output layer per task.

Liu, He, Chen, Gao. "Multi-Task Deep Neural Networks for Natural Language Understanding",
ACL 2019 (arXiv:1901.11504).

The lexicon encoder (token + position + segment embeddings) and the transformer encoder
are shared by every task; the [CLS] vector x is the sentence (or sentence-pair)
representation and each task reads it with its own layer:

    single-sentence classification   P(c | X) = softmax(W_t x)                 (Eq. 1)
    pairwise text similarity          sim(X1, X2) = w_t . x         (Eq. 2; regression)
    pairwise ranking (relevance)      Rel(Q, A) = w_t . x, trained with a softmax over
                                      one positive and several negative candidates
                                      (Eqs. 8-9); the paper's Eq. 5 passes w_t . x
                                      through an activation g first, left out here

This is hard parameter sharing with a transformer trunk, so :meth:`encode` /
:meth:`decode` expose the [CLS] representation for representation-level methods.

Left out: BERT pre-training (the encoder here is tiny and randomly initialised), the
stochastic answer network used for pairwise classification (a plain classification head
is used instead), and MT-DNN's task-mixed mini-batch sampling schedule. The encoder is
PyTorch's post-norm transformer layer with a ReLU feed-forward of width 2 d_model and no
LayerNorm on the summed embeddings (BERT, on which the official code builds, uses GELU, width
4 d_model and an embedding LayerNorm). The current official code also puts a task-specific
pooling layer on [CLS] before each output layer, configured with tanh, but its activation
lookup (``module/common.py``, which never imports ``nn``) always falls back to the identity,
so it is dropout and a plain dense layer (checked at namisan/mt-dnn HEAD in the audit); here,
as in Eq. 1, the output layer reads the [CLS] vector directly.

Official code read: github.com/namisan/mt-dnn (mt_dnn/matcher.py, tasks/__init__.py,
module/pooler.py, mt_dnn/loss.py's RankCeCriterion, a plain cross entropy over the candidates,
i.e. gamma = 1). When no segment ids are given, that code embeds every token as segment 0; here
no segment embedding is added at all, and [CLS] never gets one.

Equation numbers checked in a Markdown transcript of arXiv:1901.11504, found in the public GitHub
index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width

TASK_KINDS = ("classification", "regression", "ranking")


class MTDNN(MultiTaskModel):
    """Shared lexicon + transformer encoder, task-specific output layers on [CLS].

    ``task_kinds[t]`` is one of ``classification`` (``out_dims[t]`` logits), ``regression``
    (``out_dims[t]`` values, default 1) or ``ranking`` (one relevance score). Inputs are
    token ids ``(B, L)`` (with ``vocab_size``) or features ``(B, L, in_features)``; a vector
    batch ``(B, D)`` is read as D one-feature tokens.
    """

    name = "mtdnn"
    equations_checked_in = "a Markdown transcript of arXiv:1901.11504"

    def __init__(
        self,
        tasks: Sequence[str],
        out_dims: Mapping[str, int] | None = None,
        task_kinds: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
        in_features: int | None = None,
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 128,
        num_segments: int = 2,
    ):
        super().__init__(tasks)
        require_positive(d_model=d_model, max_len=max_len, num_layers=num_layers, num_segments=num_segments)
        split_width(d_model, num_heads)
        if (vocab_size is None) == (in_features is None):
            raise ValueError("give exactly one of vocab_size (token ids) or in_features")
        kinds = dict(task_kinds or {t: "classification" for t in self.tasks})
        if set(kinds) != set(self.tasks) or not set(kinds.values()) <= set(TASK_KINDS):
            raise ValueError(f"task_kinds must map every task to one of {TASK_KINDS}")
        out_dims = dict(out_dims or {})
        self.task_kinds = kinds

        # Lexicon encoder: token, position and segment embeddings, plus a learned [CLS].
        self.tokens = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(in_features, d_model)
        self.positions = nn.Embedding(max_len + 1, d_model)
        self.segments = nn.Embedding(num_segments, d_model)
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, 2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

        def head_width(t: str) -> int:
            if kinds[t] == "ranking":
                return 1
            if kinds[t] == "classification" and t not in out_dims:
                raise ValueError(f"classification task {t!r} needs out_dims[{t!r}]")
            return out_dims.get(t, 1)

        self.heads = nn.ModuleDict({t: nn.Linear(d_model, head_width(t)) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs):  # noqa: ANN001, ANN206
        if len(problem.input_shape) != 1:
            raise ValueError("MTDNN.from_problem reads vector inputs as sequences of scalars")
        kinds = {t: "regression" for t in problem.tasks}
        return cls(problem.tasks, problem.out_dims, kinds, in_features=1, d_model=width,
                   max_len=problem.input_shape[0], **kwargs)

    def embed(self, x: Tensor, segments: Tensor | None = None) -> Tensor:
        """Lexicon encoder: (B, L[, F]) -> (B, 1 + L, d) with [CLS] in front."""
        if x.dtype.is_floating_point and x.dim() == 2:
            x = x.unsqueeze(-1)
        h = self.tokens(x)
        if segments is not None:
            h = h + self.segments(segments)
        h = torch.cat([self.cls.expand(h.shape[0], 1, -1), h], dim=1)
        return h + self.positions(torch.arange(h.shape[1], device=h.device))

    def encode(self, x: Tensor, segments: Tensor | None = None) -> Tensor:
        """The shared [CLS] representation, (B, d)."""
        return self.encoder(self.embed(x, segments))[:, 0]

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            y = self.heads[t](z)
            out[t] = y.squeeze(-1) if self.task_kinds[t] == "ranking" else y
        return out

    def forward(self, x: Tensor, segments: Tensor | None = None) -> dict[str, Tensor]:
        return self.decode(self.encode(x, segments))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()

    @staticmethod
    def ranking_loss(scores: Tensor, positive: Tensor, gamma: float = 1.0) -> Tensor:
        """Pairwise ranking objective: -log softmax(gamma * Rel(Q, A))[positive].

        ``scores`` is (queries, candidates): the relevance of each candidate answer.
        """
        return F.cross_entropy(gamma * scores, positive)
