"""BMTAS: differentiable search of a branched multi-task encoder under a resource loss.

Bruggemann, Kanakis, Georgoulis, Van Gool, "Automated Search for Resource-Efficient Branched
Multi-Task Networks", BMVC 2020, arXiv:2008.10292 (official code: github.com/brdav/bmtas).

The search space holds every branching tree of a T-task encoder (see :mod:`.bmtn`): each
layer l of the supergraph has T parallel copies of the layer, and task t picks one of them
through a categorical distribution with logits alpha_l[t] (a T x T matrix per layer). Tasks
that pick the same copy at layer l, and shared the same parent branch above, share the layer.
During the search every task runs its own path, mixing the copies with Gumbel-softmax weights;
after it, each task takes its most likely copy (evaluation mode here), which fixes a tree.
:meth:`BMTAS.branch_tree` reads that tree off and :meth:`BMTAS.to_branched` builds the
corresponding :class:`.bmtn.BranchedMultiTaskNetwork` with the chosen copies' weights (tested:
same outputs).

A proxyless resource loss steers the search towards small trees. It is the expected cost of
the sampled tree, sum_l sum_P P_l(P) |P| c_l, where c_l is the cost of one copy of layer l,
|P| the number of branches of partition P, and P_l(P) the probability that the tasks are
grouped as P at layer l. As in the official code, P_l(P) is the probability that the layer's
choices induce P, times the probability that the layer above was grouped by a partition that
P refines; the all-separate partition takes the remaining mass. For one layer this is the exact
expectation, and for one-hot choices that never re-join tasks split above it equals the fixed
tree's cost (both tested). Choices that do re-join them count as all-separate there, one copy
per task, where :meth:`BMTAS.branch_tree` keeps the groups of the layer above: the recursion
overestimates that case, as the official code does (tested). The sum runs over all T^T joint
choices of copies at once, as one tensor (:func:`joint_choice_probabilities`), so the model
refuses more than :data:`MAX_TASKS` tasks rather than exhaust memory.

The search trains the weights and the choice logits together on the task losses plus the
resource loss: :meth:`BMTAS.auxiliary_loss` gives ``resource_weight`` x the resource loss as a
fraction of the all-separate encoder's cost (sum_l T c_l), so that the weight does not depend
on the unit of ``layer_costs``; the training harness adds it every step (``resource_weight`` =
0.1 and the normalisation are ours: the official default is 0.05 on GFLOPs, added once per
task in every choice-update step, so T times in effect, with the temperature annealed from 5
to 0.1; brdav/bmtas at e37b8d1).

The paper's equations are not cited by number: its text was not available to check them.

Left out: the MobileNetV2 / DeepLabv3+ supergraph, FLOP look-up tables (``layer_costs`` are
given; the default counts parameters), the warm-up phase, temperature annealing, the separate
architecture optimiser and the retraining of the found tree (:attr:`BMTAS.training_procedure`
says so when the harness trains it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_non_negative
from .base import MultiTaskModel
from .bmtn import BranchedMultiTaskNetwork, Partition, Tree, partitions
from .dmtg import gumbel_softmax
from .encoders import heads_for, trunk_for
from .registry import Problem


def induced_partition(choice: Sequence[int], tasks: Sequence[str]) -> Partition:
    """Group the tasks by the copy each one chose (groups ordered by first task)."""
    groups: dict[int, list[str]] = {}
    for c, t in zip(choice, tasks):
        groups.setdefault(c, []).append(t)
    return tuple(tuple(g) for g in groups.values())


#: The resource loss sums over all T^T joint choices per layer: 7^7 = 823,543 (877 partitions);
#: 8^8 = 16.8 million would take gigabytes to tabulate. ``benchmarks/bmtas_resource_loss.py`` times it.
MAX_TASKS = 7


def joint_choice_probabilities(p: Tensor) -> Tensor:
    """prod_t p[t, c_t] for every joint choice c of copies, task 0's copy the slowest digit."""
    joint = p[0]
    for row in p[1:]:
        joint = (joint.unsqueeze(-1) * row).flatten()
    return joint


def first_appearance_labels(choices: Tensor) -> Tensor:
    """Relabel each row's values in order of first appearance: rows that group the tasks alike
    (induce one partition) get equal labels, those of the partition's blocks ordered by first task."""
    rows, n = choices.shape
    r = torch.arange(rows)
    label_of = torch.full((rows, n), -1)  # label_of[row, copy], -1 until the copy appears
    seen = torch.zeros(rows, dtype=torch.long)
    labels = torch.empty_like(choices)
    for i in range(n):
        c = choices[:, i]
        new = label_of[r, c] < 0
        label_of[r[new], c[new]] = seen[new]
        seen += new
        labels[:, i] = label_of[r, c]
    return labels


def _canonical(p: Partition, tasks: Sequence[str]) -> Partition:
    order = {t: i for i, t in enumerate(tasks)}
    return tuple(sorted((tuple(sorted(g, key=order.get)) for g in p), key=lambda g: order[g[0]]))


def meet(fine: Partition, coarse: Partition, tasks: Sequence[str]) -> Partition:
    """Common refinement: tasks stay together only where both partitions keep them together."""
    return _canonical(tuple(tuple(t for t in f if t in c) for f in fine for c in coarse if set(f) & set(c)), tasks)


class BMTAS(MultiTaskModel):
    """Supergraph: T copies of every layer, per-layer T x T choice logits, a head per task."""

    name = "bmtas"
    training_procedure = ("the search has a warm-up, an annealed temperature and its own optimiser for the choice "
                          "logits, and the tree it finds (to_branched()) is then retrained from scratch")

    def __init__(self, tasks: Sequence[str], layers: Sequence[nn.Module], heads: Mapping[str, nn.Module],
                 layer_costs: Sequence[float] | None = None, tau: float = 1.0, seed: int = 0,
                 resource_weight: float = 0.1):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_non_negative(resource_weight=resource_weight)
        n = len(self.tasks)
        if n > MAX_TASKS:
            raise ValueError(f"BMTAS's resource loss sums over all T^T joint choices of copies per layer, "
                             f"{n}^{n} here; it supports at most {MAX_TASKS} tasks")
        self.copies = nn.ModuleList(nn.ModuleList(copy.deepcopy(layer) for _ in range(n)) for layer in layers)
        self.alphas = nn.Parameter(torch.zeros(len(layers), n, n))  # alpha_l[task, copy]
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        if layer_costs is None:
            layer_costs = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        self.layer_costs = [float(c) for c in layer_costs]
        self.tau, self.resource_weight = tau, resource_weight
        self.generator = torch.Generator().manual_seed(seed)
        self._partitions = [_canonical(p, self.tasks) for p in partitions(self.tasks)]
        self._tables(n)

    def _tables(self, n: int) -> None:
        """Which partition each joint choice induces, and which partitions refine which (buffers)."""
        def code(labels: Tensor) -> Tensor:
            return labels @ n ** torch.arange(n - 1, -1, -1)
        labels = torch.tensor([[next(b for b, g in enumerate(p) if t in g) for t in self.tasks]
                               for p in self._partitions])  # (P, T): block of each task
        codes = code(labels)
        order = codes.argsort()
        choices = torch.stack(torch.meshgrid(*[torch.arange(n)] * n, indexing="ij"), -1).reshape(-1, n)
        induced = order[torch.searchsorted(codes[order], code(first_appearance_labels(choices)))]
        together = (labels.unsqueeze(-1) == labels.unsqueeze(-2)).flatten(1).float()  # (P, T * T)
        refines = (together @ (1 - together).T) == 0  # no pair together in the fine one, apart in the coarse
        self.register_buffer("_induced", induced, persistent=False)  # (T^T,) partition index
        self.register_buffer("_refines", refines, persistent=False)  # (P, P): [fine, coarse]
        self.register_buffer("_sizes", labels.amax(-1) + 1, persistent=False)  # (P,) branches
        self.register_buffer("_all_separate", self._sizes == n, persistent=False)  # (P,) one partition

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, **kwargs: object) -> "BMTAS":
        layers = list(trunk_for(problem.input_shape, width, depth).blocks)
        return cls(problem.tasks, layers, heads_for(problem, width), **kwargs)

    def choice_weights(self) -> Tensor:
        """(L, T, T) weights over copies: Gumbel-softmax samples in training, argmax one-hot in eval."""
        if self.training:
            return gumbel_softmax(self.alphas, self.tau, self.generator)
        return torch.zeros_like(self.alphas).scatter(-1, self.alphas.argmax(-1, keepdim=True), 1.0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        w = self.choice_weights()
        out = {}
        for i, t in enumerate(self.tasks):
            h = x
            for layer_copies, w_l in zip(self.copies, w):
                h = sum(w_l[i, j] * op(h) for j, op in enumerate(layer_copies))
            out[t] = self.heads[t](h)
        return out

    # ------------------------------------------------------------------ resource loss

    def partition_probabilities(self) -> Tensor:
        """(L, P): P_l(P) for every layer and partition (in ``_partitions`` order), following the
        official recursion: the probability that the layer's choices induce P, times that of the
        layer above being grouped by a partition P refines; all-separate takes the rest."""
        result: list[Tensor] = []
        for p_l in torch.softmax(self.alphas, dim=-1):
            induced = p_l.new_zeros(len(self._partitions)).index_add(
                0, self._induced, joint_choice_probabilities(p_l))
            above = 1.0 if not result else self._refines.to(p_l.dtype) @ result[-1]
            layer = torch.where(self._all_separate, 0.0, induced * above)
            result.append(torch.where(self._all_separate, 1 - layer.sum(), layer))
        return torch.stack(result)

    def resource_loss(self) -> Tensor:
        """Expected cost sum_l sum_P P_l(P) |P| c_l of the sampled branched encoder."""
        costs = torch.tensor(self.layer_costs, dtype=self.alphas.dtype, device=self.alphas.device)
        return (self.partition_probabilities() * self._sizes).sum(-1) @ costs

    def auxiliary_loss(self) -> Tensor:
        """``resource_weight`` x the resource loss over the all-separate cost (no forward pass needed)."""
        separate = len(self.tasks) * sum(self.layer_costs)
        return self.resource_weight * self.resource_loss() / max(separate, 1e-12)

    # ------------------------------------------------------------ the tree after search

    def branch_tree(self) -> Tree:
        """Per layer, the partition of the most likely choices, refined by the layer above."""
        tree: list[Partition] = []
        above: Partition = (tuple(self.tasks),)
        for a_l in self.alphas.detach():
            above = meet(induced_partition(a_l.argmax(-1).tolist(), self.tasks), above, self.tasks)
            tree.append(above)
        return tuple(tree)

    def to_branched(self) -> BranchedMultiTaskNetwork:
        """The fixed tree, each branch holding the weights of the copy its tasks chose."""
        tree = self.branch_tree()
        net = BranchedMultiTaskNetwork(self.tasks, [c[0] for c in self.copies], tree, copy.deepcopy(self.heads))
        choice = self.alphas.detach().argmax(-1)
        for d, partition in enumerate(tree):
            for g in partition:
                chosen = self.copies[d][int(choice[d, self.tasks.index(g[0])])]
                net.branches[f"{d}:" + "+".join(g)].load_state_dict(chosen.state_dict())
        return net.to(self.alphas.device)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
