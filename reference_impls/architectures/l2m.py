"""Learning to Modulate (L2M): a frozen model modulated by LoRA weights retrieved from a keyed pool.

Schmied, Hofmarcher, Paischer, Pascanu, Hochreiter, "Learning to Modulate pre-trained Models in
RL", NeurIPS 2023, arXiv:2306.14884.

Fine-tuning a pre-trained (multi-domain Decision Transformer) policy on new tasks makes it forget
the old ones. L2M leaves the pre-trained weights frozen and keeps a pool of M modulators, each a
set of low-rank (LoRA) updates for the model's weight matrices and each paired with a learnable
key k_i. The query q is an aggregate of the frozen model's embeddings of the input (the mean of
the embedded state tokens of the current context); the modulator whose key is most similar to
it is retrieved,

    j(x) = argmax_i cos(q(x), k_i)                                         (tested by hand)
    h = W0 h_in + (alpha / r) B_j A_j h_in       in every modulated layer  (LoRA, :mod:`.lora`)

so the choice depends on the input, never on a task id, and inputs from different tasks can
reach different modulators while the frozen model, and with it every earlier skill, stays as it
was. Retrieval is a hard argmax, so the task loss trains only the retrieved modulator (tested)
and never the keys; as in L2P (:mod:`.l2p`), the keys are pulled towards the queries that chose
them by subtracting lam * cos(q(x), k_j(x)) from the loss (:meth:`L2M.key_pull_loss`, tested;
:meth:`L2M.auxiliary_loss` gives it for the last forward pass times lam = ``key_weight``, 0.5 by
default, the official code's (decision_transformer_sb3.py, not overridden by its README's L2M
run), and the training harness adds it).
B starts at zero, so the untrained model is the frozen one (tested), and a pool of one
modulator is LoRA with one update shared by every task (tested).

Stand-ins: the frozen network is a random ``trunk_for`` backbone whose first layer plays the
embedding (it computes the query and is not modulated) and whose other layers are modulated;
images average the embedding over pixels for the query. Heads are per task; the pool and keys
are shared. alpha = 2r and top-1 retrieval follow the official code's defaults.

The method is described in the paper's Sec. 3 and Fig. 3; its equation numbers were not checked.

Left out: the pre-trained Decision Transformer and its Meta-World / DMControl / Continual-World
data, the choice of modulated matrices (queries, values and feed-forward layers of attention
blocks; here every layer after the embedding), the official code's penalty that down-weights
frequently retrieved keys, and the continual-learning protocol. A is drawn as in :mod:`.lora`
(Gaussian), where the official code uses Kaiming-uniform over the whole 5-D pool tensor (so its
entries are several times smaller than standard LoRA's). Its feed-forward modulation reads the
output of the first feed-forward layer (4d -> r -> 4d) and adds to it, where every modulated
layer here adapts its own input; its action head is frozen and shared (one trained head per
task here); its configuration uses rank 8 and a pool of 30 (2 and 4 here). Checked against
ml-jku/L2M at 0a4747b.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import backbone_layers, heads_for, trunk_for
from .lora import low_rank_pair
from .registry import Problem


class ModulatorPool(nn.Module):
    """M modulators (one LoRA pair per modulated layer each) and one learnable key per modulator."""

    def __init__(self, layers: Sequence[nn.Linear | nn.Conv2d], size: int, rank: int, key_dim: int):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(size, key_dim).uniform_(-1, 1))
        pairs = [[low_rank_pair(layer, rank) for layer in layers] for _ in range(size)]
        self.down = nn.ModuleList(nn.ModuleList(a for a, _ in entry) for entry in pairs)  # A[i][l]
        self.up = nn.ModuleList(nn.ModuleList(b for _, b in entry) for entry in pairs)  # B[i][l]

    def similarity(self, query: Tensor) -> Tensor:
        """cos(q, k_i) for every example and key: (B, M)."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(self, query: Tensor) -> Tensor:
        """j(x): the index of the most similar key per example, (B,)."""
        return self.similarity(query).argmax(dim=1)

    def update(self, h: Tensor, layer: int, chosen: Tensor) -> Tensor:
        """B_j A_j h for layer ``layer``, each example with its own retrieved modulator j."""
        out = None
        for i in chosen.unique().tolist():  # only retrieved modulators run, so only they get gradient
            mask = (chosen == i).to(h.dtype).view(-1, *([1] * (h.ndim - 1)))
            term = mask * self.up[i][layer](self.down[i][layer](h))
            out = term if out is None else out + term
        return out


class L2M(MultiTaskModel):
    """A frozen backbone (embedding + modulated layers), a shared keyed modulator pool, task heads."""

    name = "l2m"
    per_pass_attributes = ("_key_loss",)

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module],
                 pool_size: int = 4, rank: int = 2, alpha: float | None = None, key_weight: float = 0.5):
        super().__init__(tasks)
        require_positive(pool_size=pool_size)
        layers = backbone_layers(backbone, purpose="modulate")
        if len(layers) < 2:
            raise ValueError("L2M needs an embedding layer and at least one layer to modulate")
        backbone.requires_grad_(False)  # the pre-trained model stays fixed
        self.embedding, self.layers = layers[0], nn.ModuleList(layers[1:])
        key_dim = self.embedding.weight.shape[0]
        self.pool = ModulatorPool(self.layers, pool_size, rank, key_dim)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.scale = (2.0 * rank if alpha is None else alpha) / rank
        self.key_weight = key_weight
        self._key_loss: Tensor | None = None  # -mean cos(q, k_j) of the last forward pass

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, **kw: float) -> "L2M":
        backbone = trunk_for(problem.input_shape, width, depth)  # stand-in for the pre-trained model
        return cls(problem.tasks, backbone, heads_for(problem, width), **kw)

    def embed(self, x: Tensor) -> Tensor:
        return torch.relu(self.embedding(x))

    @staticmethod
    def query_of(embedded: Tensor) -> Tensor:
        """q: the embedding averaged over positions (pixels for images), without gradient."""
        return embedded.detach().flatten(2).mean(-1) if embedded.ndim > 2 else embedded.detach()

    def retrieve(self, x: Tensor) -> Tensor:
        """Index of the modulator each example gets, (B,)."""
        return self.pool.select(self.query_of(self.embed(x)))

    def features(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        best, chosen = self.pool.similarity(self.query_of(h)).max(dim=1)
        self._key_loss = -best.mean()  # the key pull, for auxiliary_loss
        for i, layer in enumerate(self.layers):
            h = torch.relu(layer(h) + self.scale * self.pool.update(h, i, chosen))
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {t: self.heads[t](h) for t in self.tasks}

    def auxiliary_loss(self) -> Tensor:
        """``key_weight`` x the key pull of the last forward pass: what trains the keys, which the
        task loss cannot reach through the hard argmax. The training harness adds it."""
        if self._key_loss is None:
            raise RuntimeError("auxiliary_loss() reads the last forward pass; call the model first")
        return self.key_weight * self._key_loss

    def key_pull_loss(self, x: Tensor) -> Tensor:
        """-mean cos(q(x), k_j(x)); add lam times it to the task losses to train the keys."""
        similarity = self.pool.similarity(self.query_of(self.embed(x)))
        return -similarity.max(dim=1).values.mean()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
