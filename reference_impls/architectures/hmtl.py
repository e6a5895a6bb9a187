"""Hierarchical supervision: low-level tasks read lower layers, high-level tasks read higher ones.

Søgaard & Goldberg. "Deep multi-task learning with low level tasks supervised at lower
layers", ACL 2016 — a stack of BiLSTMs where POS tagging is predicted from layer 1 and
chunking / CCG from the top: the lower task shapes the layers the higher task builds on.
Hashimoto, Xiong, Tsuruoka, Socher. "A Joint Many-Task Model: Growing a Neural Network for
Multiple NLP Tasks", EMNLP 2017 (JMT, arXiv:1611.01587) adds *shortcut connections*: every
layer also receives the input embeddings and the *label embeddings* of the task just below
(the predicted label distribution times a learned label-embedding matrix: JMT's Eq. 2,
fed with the layer below and the word vectors into the next BiLSTM of its Eq. 1, Sec. 2.3).
Sanh, Wolf, Ruder. "A Hierarchical Multi-task Approach for Learning Embeddings from
Semantic Tasks", AAAI 2019 (HMTL, arXiv:1811.06031) uses the same hierarchy (NER, entity
mention detection, coreference, relation extraction) with input shortcuts.

One generic module: ``task_depths[t] = k`` means task t is predicted from layer k. By default
it is Søgaard & Goldberg's stack (``shortcut=False``, ``label_embedding_dim=0``); HMTL needs
``shortcut=True`` and JMT also a positive ``label_embedding_dim`` (the label feed), e.g.
``--arch-kw shortcut=true label_embedding_dim=8``.

    h_1 = cell_1(x)
    h_k = cell_k([h_{k-1}; x (shortcut);
                  softmax(y_s) E_s for each task s at depth k-1 (label feed)])
    y_t = head_t(h_{task_depths[t]})        (max-pooled over time for sentence-level tasks,
                                              JMT's Eq. 4)

So a task never depends on layers above its own depth. JMT can feed label embeddings of
several lower tasks to one layer (it adds them); here a layer reads, concatenated, those of
the tasks one level below. JMT's equation numbers were read in transcripts of
arXiv:1611.01587 (an ar5iv rendering and an earlier ICLR-style version number them alike).
Left out: JMT's successive regularisation term (in its per-layer objectives, Eq. 6 and
after) and its character n-gram embeddings,
HMTL's training schedule and its task-specific architectures (CRF, coreference scorer);
cells are small MLP or BiLSTM layers.

The HMTL parts were compared with github.com/huggingface/hmtl (hmtl/models/hmtl.py and
layerNerEmdRelation.py, hmtl/modules/text_field_embedders/shortcut_connect_text_field_embedder.py,
configs/hmtl_coref_conll.json); no released code was compared for JMT or Søgaard & Goldberg.
In the HMTL code every task owns its encoder (a BiLSTM of one to three layers; coreference's
has one), so relation
extraction and coreference, which both sit on the mention-detection encoder, each get their
own top encoder; here tasks given the same depth share that depth's single layer.

Equation numbers checked in transcripts of arXiv:1611.01587, found in the public GitHub index.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel


class _BiLSTMCell(nn.Module):
    """(B, L, in) -> (B, L, out): one bidirectional LSTM layer, out/2 units per direction."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim % 2:
            raise ValueError("a BiLSTM cell needs an even hidden size")
        self.lstm = nn.LSTM(in_dim, out_dim // 2, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x)[0]


class HierarchicalMTL(MultiTaskModel):
    """Supervision at different depths (Søgaard & Goldberg / JMT / HMTL)."""

    name = "hmtl"
    equations_checked_in = "transcripts of arXiv:1611.01587"

    def __init__(
        self,
        tasks: Sequence[str],
        in_dim: int,
        out_dims: Mapping[str, int],
        task_depths: Mapping[str, int] | None = None,
        hidden_dim: int = 32,
        cell: str = "mlp",
        shortcut: bool = False,
        label_embedding_dim: int = 0,
        sentence_tasks: Collection[str] = (),
    ):
        super().__init__(tasks)
        require_positive(hidden_dim=hidden_dim)
        require_non_negative(label_embedding_dim=label_embedding_dim)  # 0 is the plain stack; -1 is a typo
        # Default hierarchy: tasks in the order given, lowest first, one layer each.
        depths = dict(task_depths or {t: k + 1 for k, t in enumerate(self.tasks)})
        if set(depths) != set(self.tasks) or min(depths.values()) < 1:
            raise ValueError(f"task_depths must give every task a depth >= 1, got {depths}")
        if cell not in ("mlp", "bilstm"):
            raise ValueError(f"cell must be 'mlp' or 'bilstm', got {cell!r}")
        self.task_depths = depths
        self.num_layers = max(depths.values())
        self.shortcut = shortcut
        self.label_feed = label_embedding_dim > 0
        self.sequence = cell == "bilstm"
        self.sentence_tasks = frozenset(sentence_tasks)

        self.layers = nn.ModuleList()
        for k in range(1, self.num_layers + 1):
            width = in_dim if k == 1 else hidden_dim + (in_dim if shortcut else 0)
            if k > 1 and self.label_feed:
                width += label_embedding_dim * len(self.tasks_at(k - 1))
            self.layers.append(
                _BiLSTMCell(width, hidden_dim)
                if self.sequence
                else nn.Sequential(nn.Linear(width, hidden_dim), nn.ReLU())
            )
        self.heads = nn.ModuleDict({t: nn.Linear(hidden_dim, out_dims[t]) for t in self.tasks})
        # JMT label embeddings: only tasks that have a layer above them feed one.
        self.label_embeddings = nn.ModuleDict(
            {
                t: nn.Linear(out_dims[t], label_embedding_dim, bias=False)
                for t in self.tasks
                if self.label_feed and depths[t] < self.num_layers
            }
        )

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs):  # noqa: ANN001, ANN206
        if len(problem.input_shape) != 1:
            raise ValueError("HierarchicalMTL.from_problem builds the vector (MLP) variant")
        return cls(problem.tasks, problem.input_shape[0], problem.out_dims, hidden_dim=width, **kwargs)

    def tasks_at(self, depth: int) -> list[str]:
        return [t for t in self.tasks if self.task_depths[t] == depth]

    def _predict(self, task: str, hidden: Tensor) -> Tensor:
        if self.sequence and task in self.sentence_tasks:
            hidden = hidden.max(dim=1).values  # JMT pools sentence-level tasks with max
        return self.heads[task](hidden)

    def _label_feed(self, outputs: Mapping[str, Tensor], like: Tensor) -> list[Tensor]:
        feeds = []
        for t in sorted(outputs, key=self.tasks.index):
            emb = self.label_embeddings[t](torch.softmax(outputs[t], dim=-1))
            if emb.dim() < like.dim():  # a sentence-level label feeds every position
                emb = emb.unsqueeze(1).expand(-1, like.shape[1], -1)
            feeds.append(emb)
        return feeds

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        hidden = x
        for k, layer in enumerate(self.layers, start=1):
            if k > 1:
                parts = [hidden]
                if self.shortcut:
                    parts.append(x)
                if self.label_feed:
                    below = {t: outputs[t] for t in self.tasks_at(k - 1)}
                    parts += self._label_feed(below, hidden)
                hidden = torch.cat(parts, dim=-1)
            hidden = layer(hidden)
            for t in self.tasks_at(k):
                outputs[t] = self._predict(t, hidden)
        return {t: outputs[t] for t in self.tasks}

    def _users(self) -> list[tuple[set[str], list[nn.Parameter]]]:
        """Each parameter group with the set of tasks whose outputs depend on it."""
        above = lambda k: {t for t in self.tasks if self.task_depths[t] >= k}  # noqa: E731
        groups = [(above(k), list(layer.parameters())) for k, layer in enumerate(self.layers, 1)]
        for t in self.tasks:
            fed = above(self.task_depths[t] + 1) if t in self.label_embeddings else set()
            groups.append(({t} | fed, list(self.heads[t].parameters())))
            if t in self.label_embeddings:
                groups.append((fed, list(self.label_embeddings[t].parameters())))
        return groups

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for users, params in self._users():
            if users == {task}:
                yield from params
