"""TreeMTL: rank every tree-structured multi-task architecture from pairwise measurements.

Zhang, Liu, Guan, "A Tree-Structured Multi-Task Model Recommender", AutoML-Conf 2022
(PMLR 188), arXiv:2203.05092: the task accuracy estimator and the design space enumerator
(its Layout data structure). Equations are named, not numbered: the paper's numbering
could not be checked here; the rule follows the authors' code (github.com/zhanglijun95/TreeMTL).

A backbone is cut into B blocks at its branching points. A tree-structured architecture
("layout") says, for every block b, which tasks share that block: a partition of the K
tasks, each group running its own copy of the block. Once two tasks are separated they
stay separated, so the partition of block b + 1 refines that of block b. Block 0 split
into singletons is K independent networks; one group everywhere is a fully shared
backbone.

The recommender scores every layout without training it, from the 2-task models alone.
For tasks i and j, let ``A[b, i, j]`` be the measured performance of task i in the 2-task
model of (i, j) that shares the first b blocks and branches after them (b = 0: separate
networks, b = B: fully shared). This is a task-affinity matrix per branching point. In a
layout, i and j share exactly the blocks before their branch point b_ij (the first block
where they are in different groups), so the estimate of task i is the mean over its
partners,

    â_i = 1/(K − 1) Σ_{j≠i} A[b_ij, i, j],       score = Σ_i w_i â_i,

with equal weights w_i = 1/K, or, as in the authors' code, weights that trust tasks whose
2-task performance varies smoothly with the branch point (one minus the normalised SVD
entropy of that sequence, renormalised to sum to one). The layouts are then sorted by
score, optionally after dropping those over a compute budget (a block copied for g groups
costs g times its cost; the authors measure the FLOPs of the built models instead, so this
filter is an analytic stand-in; layouts, weights and scores matched zhanglijun95/TreeMTL to
2.2e-16 in the audit).

Left out: training the 2-task models that fill ``A`` (the caller measures them; any
pairwise affinity per branching point can be used instead), the automatic branching point
detector for a given CNN, and building the recommended network.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.checks import require_at_least, require_positive

Partition = tuple[tuple[int, ...], ...]  # groups of task indices, sorted
Layout = tuple[Partition, ...]  # one partition per block, each refining the previous one


def partitions(items: Sequence[int]) -> list[Partition]:
    """All set partitions of ``items`` (Bell-number many), groups sorted."""
    if not items:
        return [()]
    first, rest = items[0], items[1:]
    out = []
    for part in partitions(rest):
        out.append(tuple(sorted(((first,),) + part)))  # ``first`` alone
        for g in range(len(part)):  # or ``first`` added to one existing group
            joined = tuple(sorted((first,) + part[g]))
            out.append(tuple(sorted(part[:g] + (joined,) + part[g + 1:])))
    return out


def refinements(partition: Partition) -> list[Partition]:
    """Every partition obtained by splitting some groups of ``partition`` further."""
    return [tuple(sorted(itertools.chain(*choice)))
            for choice in itertools.product(*(partitions(g) for g in partition))]


def enumerate_layouts(num_tasks: int, num_blocks: int) -> list[Layout]:
    """The whole design space: chains of B partitions, each refining the one before."""
    require_positive(num_tasks=num_tasks, num_blocks=num_blocks)
    layouts: list[Layout] = [(p,) for p in partitions(tuple(range(num_tasks)))]
    for _ in range(num_blocks - 1):
        layouts = [lay + (p,) for lay in layouts for p in refinements(lay[-1])]
    return layouts


def branch_point(layout: Layout, i: int, j: int) -> int:
    """Number of blocks tasks i and j share: the first block that separates them (B if none)."""
    for b, partition in enumerate(layout):
        if not any(i in g and j in g for g in partition):
            return b
    return len(layout)


def task_estimates(layout: Layout, affinity: Tensor) -> Tensor:
    """â_i: mean over partners j of A[b_ij, i, j] (``affinity`` has shape (B + 1, K, K))."""
    k = affinity.shape[1]
    out = torch.zeros(k, dtype=affinity.dtype, device=affinity.device)
    for i in range(k):
        out[i] = torch.stack([affinity[branch_point(layout, i, j), i, j] for j in range(k) if j != i]).mean()
    return out


def svd_entropy(sequence: Tensor, order: int = 3) -> Tensor:
    """Normalised SVD entropy of a 1-D sequence (delay embedding of ``order`` lags)."""
    require_at_least(2, order=order)  # the entropy is divided by log2(order)
    if order > len(sequence):
        raise ValueError(f"order must be at most the sequence length {len(sequence)}, got {order}")
    windows = sequence.unfold(0, order, 1)  # (len − order + 1) x order
    s = torch.linalg.svdvals(windows)
    s = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    return -(s * torch.log2(s.clamp_min(1e-300))).sum() / math.log2(order)


def fluctuation_weights(affinity: Tensor, order: int = 3) -> Tensor:
    """w_i ∝ 1 − mean_j SVD entropy of A[1:, i, j] over branch points (authors' code)."""
    k = affinity.shape[1]
    trust = torch.stack([
        1 - torch.stack([svd_entropy(affinity[1:, i, j], order) for j in range(k) if j != i]).mean()
        for i in range(k)
    ])
    return trust / trust.sum()


def layout_cost(layout: Layout, block_costs: Sequence[float]) -> float:
    """Compute of a layout: each block runs once per group that uses it."""
    return sum(len(partition) * cost for partition, cost in zip(layout, block_costs))


def recommend(
    affinity: Tensor,
    top_k: int = 5,
    weights: Tensor | None = None,
    block_costs: Sequence[float] | None = None,
    budget: float | None = None,
) -> list[tuple[Layout, float]]:
    """The ``top_k`` layouts by estimated score (within ``budget`` when given), best first."""
    require_positive(top_k=top_k)
    if budget is not None:
        require_at_least(0, budget=budget)
    if block_costs is not None:
        require_at_least(0, **{f"block_costs[{b}]": c for b, c in enumerate(block_costs)})
    num_blocks, k = affinity.shape[0] - 1, affinity.shape[1]
    if affinity.shape != (num_blocks + 1, k, k) or num_blocks < 1 or k < 2:
        raise ValueError(f"affinity must have shape (B + 1, K, K) with B >= 1, K >= 2, got {tuple(affinity.shape)}")
    weights = torch.full((k,), 1 / k, dtype=affinity.dtype, device=affinity.device) if weights is None else weights
    layouts = enumerate_layouts(k, num_blocks)
    if budget is not None:
        costs = block_costs if block_costs is not None else [1.0] * num_blocks
        layouts = [lay for lay in layouts if layout_cost(lay, costs) <= budget]
    scored = [(lay, float(weights @ task_estimates(lay, affinity))) for lay in layouts]
    return sorted(scored, key=lambda pair: -pair[1])[:top_k]
