"""Branched multi-task networks: a tree of layers chosen from task affinities per layer.

Vandenhende, Georgoulis, De Brabandere, Van Gool, "Branched Multi-Task Networks: Deciding
What Layers To Share", BMVC 2020, arXiv:1904.02920.

A branched network shares its first layers between all tasks and splits into task groups
deeper down, so every layer d carries a partition of the tasks into groups, each deeper
partition a refinement of the one above. The paper picks that tree in three steps
(its Sec. 3, "Method"):

1. Train one network per task. At each candidate branching location d, pass the same K
   images through every task's network and build a representation dissimilarity matrix
   (RDM): entry (m, n) is 1 minus the Pearson correlation between the features of images
   m and n (:func:`rdm`).
2. The affinity of tasks i and j at d is the Spearman rank correlation between the upper
   triangles of their RDMs (:func:`spearman`, :func:`task_affinity`): tasks whose features
   order the images alike are related there.
3. Among all trees within a parameter budget, take the one with the lowest task
   dissimilarity score: summed over locations, the mean over the groups at d of the
   largest dissimilarity (1 - affinity) between two tasks in the same group
   (:func:`dissimilarity_score`, :func:`select_tree`). Singletons cost nothing; a group
   costs as much as its least related pair.

:class:`BranchedMultiTaskNetwork` builds any such tree from a per-layer recipe: one copy
of layer d per group at d, each reading the output of its parent group at d - 1.

Left out: the paper's large backbones (ResNet-50, MobileNet) and its data sets; trees are
enumerated exhaustively (fine for a handful of tasks; the paper cannot have enumerated its
40-task CelebA trees, so its search there was not exhaustive), and the parameter budget is
counted in copies of each layer rather than in exact parameters. The dissimilarity matrices
do not centre each unit over the images (``affinity/rsa.rdm`` does; up to 0.33 apart on random
data); TreeMTL's re-implementation computes them as here (to 7e-16) and scores trees the same,
but correlates the whole lower triangle, zeros included, where the upper triangle is used here.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..affinity.rsa import spearman
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem

Partition = tuple[tuple[str, ...], ...]  # disjoint groups of task names covering all tasks
Tree = tuple[Partition, ...]  # one partition per layer, each refining the one before


# ----------------------------------------------------------------- affinity (steps 1-2)


def rdm(features: Tensor) -> Tensor:
    """K x K representation dissimilarity matrix: 1 - Pearson correlation between images."""
    f = features.flatten(1)
    f = f - f.mean(dim=1, keepdim=True)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - f @ f.T


def task_affinity(features: Sequence[Tensor]) -> Tensor:
    """T x T affinity at one location from each task network's features of the same images."""
    k = features[0].shape[0]
    upper = torch.triu_indices(k, k, offset=1)
    flat = [rdm(f)[upper[0], upper[1]] for f in features]
    n = len(flat)
    aff = torch.ones(n, n, dtype=flat[0].dtype, device=flat[0].device)
    for i, j in itertools.combinations(range(n), 2):
        aff[i, j] = aff[j, i] = spearman(flat[i], flat[j])
    return aff


# ---------------------------------------------------------------- tree choice (step 3)


def partitions(tasks: Sequence[str]) -> list[Partition]:
    """Every set partition of ``tasks`` (Bell-number many)."""
    if not tasks:
        return [()]
    first, rest = tasks[0], tasks[1:]
    out: list[Partition] = []
    for p in partitions(rest):
        out.append(((first,), *p))
        for i in range(len(p)):
            out.append((*p[:i], (first, *p[i]), *p[i + 1 :]))
    return out


def refines(fine: Partition, coarse: Partition) -> bool:
    """True when every group of ``fine`` lies inside one group of ``coarse``."""
    return all(any(set(g) <= set(c) for c in coarse) for g in fine)


def enumerate_trees(tasks: Sequence[str], depth: int) -> list[Tree]:
    """Every branching of ``depth`` layers: partitions that only ever split going deeper."""
    all_parts = partitions(tasks)
    trees: list[Tree] = [(p,) for p in all_parts]
    for _ in range(depth - 1):
        trees = [(*t, p) for t in trees for p in all_parts if refines(p, t[-1])]
    return trees


def dissimilarity_score(tree: Tree, affinities: Sequence[Tensor], tasks: Sequence[str]) -> float:
    """Sum over layers of the mean, over groups, of the largest in-group 1 - affinity."""
    index = {t: i for i, t in enumerate(tasks)}
    total = 0.0
    for partition, aff in zip(tree, affinities):
        worst = []
        for group in partition:
            ids = [index[t] for t in group]
            pairs = [1.0 - aff[i, j].item() for i, j in itertools.combinations(ids, 2)]
            worst.append(max(pairs, default=0.0))
        total += sum(worst) / len(worst)
    return total


def tree_cost(tree: Tree, layer_costs: Sequence[float]) -> float:
    """Parameters of the tree in units of one copy of each layer."""
    return sum(len(p) * c for p, c in zip(tree, layer_costs))


def select_tree(
    tasks: Sequence[str], affinities: Sequence[Tensor], layer_costs: Sequence[float], budget: float
) -> Tree:
    """The lowest-scoring tree whose cost fits in ``budget`` (ties: the cheaper one)."""
    fitting = [t for t in enumerate_trees(tasks, len(affinities)) if tree_cost(t, layer_costs) <= budget]
    if not fitting:
        raise ValueError(f"no tree fits in budget {budget}; fully shared costs {sum(layer_costs)}")
    return min(fitting, key=lambda t: (dissimilarity_score(t, affinities, tasks), tree_cost(t, layer_costs)))


# ------------------------------------------------------------------------ the network


def _key(depth: int, group: Sequence[str]) -> str:
    return f"{depth}:" + "+".join(group)


class BranchedMultiTaskNetwork(MultiTaskModel):
    """One copy of ``layers[d]`` per task group of ``tree[d]``; a head per task on its leaf."""

    name = "bmtn"
    training_procedure = ("the tree is chosen by bmtn.select_tree() from bmtn.task_affinity() of the features "
                          "of separately trained single-task networks, and only then trained")

    def __init__(
        self, tasks: Sequence[str], layers: Sequence[nn.Module], tree: Sequence[Partition],
        heads: Mapping[str, nn.Module],
    ):
        super().__init__(tasks)
        if len(tree) != len(layers):
            raise ValueError(f"need one partition per layer: {len(layers)} layers, {len(tree)} partitions")
        for d, partition in enumerate(tree):
            if sorted(t for g in partition for t in g) != sorted(self.tasks):
                raise ValueError(f"layer {d}: {partition} is not a partition of {self.tasks}")
            if d and not refines(partition, tree[d - 1]):
                raise ValueError(f"layer {d}: {partition} merges groups split above ({tree[d - 1]})")
        self.tree: Tree = tuple(tuple(tuple(g) for g in p) for p in tree)
        self.branches = nn.ModuleDict(
            {_key(d, g): copy.deepcopy(layers[d]) for d, p in enumerate(self.tree) for g in p}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(
        cls, problem: Problem, width: int = 32, depth: int = 2, tree: Sequence[Partition] | None = None
    ) -> "BranchedMultiTaskNetwork":
        """Default tree: the first ``depth - 1`` layers shared, the last one per task."""
        layers = list(trunk_for(problem.input_shape, width, depth).blocks)
        if tree is None:
            shared = (tuple(problem.tasks),)
            tree = [shared] * (depth - 1) + [tuple((t,) for t in problem.tasks)]
        return cls(problem.tasks, layers, tree, heads_for(problem, width))

    def group_of(self, depth: int, task: str) -> tuple[str, ...]:
        return next(g for g in self.tree[depth] if task in g)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {(): x}  # parent group -> its output; the input is everyone's parent
        parent = {t: () for t in self.tasks}
        for d, partition in enumerate(self.tree):
            new = {g: self.branches[_key(d, g)](features[parent[g[0]]]) for g in partition}
            parent = {t: g for g in partition for t in g}
            features = new
        return {t: self.heads[t](features[parent[t]]) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for d in range(len(self.tree)):
            if self.group_of(d, task) == (task,):
                yield from self.branches[_key(d, (task,))].parameters()
        yield from self.heads[task].parameters()
