"""Sluice networks: learn what to share, per layer and per subspace.

Ruder, Bingel, Augenstein, Søgaard, "Latent Multi-task Architecture Learning", AAAI 2019
(arXiv:1705.08142; first circulated as "Sluice networks"). Each task has its own column;
the output of layer j of task k is split into M subspaces G_{k,j,1..M}. Three ingredients:

* alpha (one KM x KM matrix per layer) mixes all subspaces of all tasks:
      [h~_{1,1}, ..., h~_{K,M}]^T = alpha_j [h_{1,1}, ..., h_{K,M}]^T
* beta (one weight per task and layer) mixes the layers into the representation a task's
  output layer reads:  h~_k = sum_j beta_{k,j} h~_{k,j}  (skip connections).
* an orthogonality penalty  sum_k sum_j ||G_{k,j,1}^T G_{k,j,2}||_F^2  (with M > 2,
  summed over every pair of subspaces) pushes the subspaces of a layer apart;
  :meth:`forward_with_penalty` returns it with the outputs, and :meth:`auxiliary_loss`
  gives ``orthogonality_weight`` times the penalty of the last forward pass, which the
  training harness adds to the objective.

alpha = identity gives independent networks; alpha that averages each subspace over tasks
gives every task the same representation at every layer, i.e. hard sharing (both tested).

Left out: the paper's sequence-labelling backbone (BiLSTMs), its initialisation
(here alpha starts at self_weight on the diagonal and spreads the rest over the same
subspace of the other tasks; beta starts on the last layer; the official DyNet code starts
alpha uniform at 1/(K M) and beta at 0.9 on the last layer with 0.1 spread over the rest, and
its column-major reshape makes its stitch mix channel groups that hold both tasks, so ours
follows the paper's per-task subspaces rather than the code), and the paper's weight of
the penalty: ``orthogonality_weight`` defaults to 0, so the penalty is opt-in (e.g.
``--arch-kw orthogonality_weight=1e-3``). The penalty here is on the layer outputs (rows =
examples); the official code (github.com/sebastianruder/sluice-networks, sluice_net.py and
predictors.py) instead applies it, for M = 2 only, to the two subspace row blocks of the
LSTM weight matrices.
All layers of a column must have the same width, divisible by M, so that beta can
add them up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


def alpha_init(num_tasks: int, num_subspaces: int, self_weight: float) -> Tensor:
    """KM x KM: each subspace keeps ``self_weight`` of itself, the rest comes from the
    same subspace of the other tasks."""
    tasks = torch.eye(num_tasks) if num_tasks == 1 else (
        torch.full((num_tasks, num_tasks), (1.0 - self_weight) / (num_tasks - 1))
        + (self_weight - (1.0 - self_weight) / (num_tasks - 1)) * torch.eye(num_tasks)
    )
    return torch.kron(tasks, torch.eye(num_subspaces))


def subspace_overlap(subspaces: Sequence[Tensor]) -> Tensor:
    """sum over pairs a < b of ||G_a^T G_b||_F^2, with rows = examples (x positions)."""
    flat = [g.movedim(1, -1).reshape(-1, g.shape[1]) for g in subspaces]
    total = flat[0].new_zeros(())
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            total = total + (flat[a].T @ flat[b]).pow(2).sum()
    return total


class Sluice(MultiTaskModel):
    """Task columns from ``make_column()`` with alpha subspace mixing and beta layer mixing."""

    name = "sluice"
    per_pass_attributes = ("_last_penalty",)

    def __init__(
        self,
        tasks: Sequence[str],
        make_column: Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        num_subspaces: int = 2,
        self_weight: float = 0.9,
        orthogonality_weight: float = 0.0,
    ):
        super().__init__(tasks)
        require_positive(num_subspaces=num_subspaces)
        self.orthogonality_weight = orthogonality_weight
        self._last_penalty: Tensor | None = None  # set by forward, read by auxiliary_loss
        self.columns = nn.ModuleDict({t: make_column() for t in self.tasks})
        column = self.columns[self.tasks[0]]
        widths = set(column.widths[1:])
        if len(widths) != 1 or next(iter(widths)) % num_subspaces:
            raise ValueError(
                f"sluice needs equal layer widths divisible by {num_subspaces}, got {column.widths[1:]}"
            )
        self.num_subspaces = num_subspaces
        self.num_blocks = len(column.blocks)
        T = len(self.tasks)
        self.alphas = nn.ParameterList(
            nn.Parameter(alpha_init(T, num_subspaces, self_weight)) for _ in range(self.num_blocks)
        )
        last_layer = torch.zeros(self.num_blocks)
        last_layer[-1] = 1.0
        self.betas = nn.ParameterDict({t: nn.Parameter(last_layer.clone()) for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kw) -> "Sluice":
        heads = heads_for(problem, width)
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth), heads, **kw)

    def representations(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-task beta-mixed representations and the orthogonality penalty."""
        M = self.num_subspaces
        features = [x] * len(self.tasks)
        per_layer: list[list[Tensor]] = []
        penalty = x.new_zeros(())
        for j in range(self.num_blocks):
            outputs = [self.columns[t].blocks[j](f) for t, f in zip(self.tasks, features)]
            subspaces = [g for h in outputs for g in h.chunk(M, dim=1)]  # index k*M + m
            for k in range(len(self.tasks)):
                penalty = penalty + subspace_overlap(subspaces[k * M : (k + 1) * M])
            mixed = torch.einsum("ab,b...->a...", self.alphas[j], torch.stack(subspaces))
            features = [torch.cat(list(mixed[k * M : (k + 1) * M]), dim=1) for k in range(len(self.tasks))]
            per_layer.append(features)
        reps = [
            sum(self.betas[t][j] * per_layer[j][k] for j in range(self.num_blocks))
            for k, t in enumerate(self.tasks)
        ]
        return reps, penalty

    def forward_with_penalty(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        reps, penalty = self.representations(x)
        return {t: self.heads[t](r) for t, r in zip(self.tasks, reps)}, penalty

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs, self._last_penalty = self.forward_with_penalty(x)
        return outputs

    def auxiliary_loss(self) -> Tensor:
        """``orthogonality_weight`` x the orthogonality penalty of the last forward pass."""
        if self._last_penalty is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        return self.orthogonality_weight * self._last_penalty

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.betas[task]
        yield from self.heads[task].parameters()
