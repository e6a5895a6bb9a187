"""TAG: choose which tasks to train together from inter-task affinities averaged over training.

Fifty, Amid, Zhao, Yu, Anil, Finn, "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021, arXiv:2109.04617. Equations are named, not numbered: the paper's
numbering could not be checked here. The selection rule follows the authors' code
(github.com/google-research/google-research, ``tag/network_selection/TAG_network_selection.ipynb``,
with the direction of the affinity dictionary taken from ``tag/taskonomy/tag.patch``).

TAG trains all K tasks together once and, every few steps, measures the inter-task affinity
Z[i, j]: how much a lookahead step on task i alone lowers task j's loss on the batch
(:func:`reference_impls.affinity.transference.lookahead_transference`, row i stepped on,
column j measured). The matrices are averaged over training (:class:`AffinityAverage`).
This module is the second half: turning the averaged matrix into task groups.

A group G of two or more tasks is scored *onto* each of its members a by the mean affinity
the other members give it,

    S(G, a) = 1/(|G| − 1) · Σ_{b ∈ G, b ≠ a} Z[b, a]      (the diagonal Z[a, a] is never used)

A grouping is a set of at most ``num_groups`` such groups (each one network to train) that
together contain every task. Groups may overlap: a task can sit in several networks, and
it is served by the one whose affinity onto it is highest. The grouping's score is

    score = 1/K · Σ_a max_{G in grouping, a ∈ G} S(G, a),

and TAG returns the grouping with the highest score. The search here is exhaustive over
all 2^K − K − 1 candidate groups, exact, and exponential in K, as in the authors' code;
fine for the handful of tasks TAG groups (5 on Taskonomy, 9 on CelebA with 3 groups is
already about 2 · 10^7 candidate sets).

A task alone has no affinity onto it: the authors' code gives a singleton group the score
−10^6 for its task, so no selected singleton ever serves a task while some shared group
can. Here singletons are simply not candidates and every task must share a group, which
gives the same choice unless affinities reach that magnitude. Ties are broken towards fewer
groups, then the first set in enumeration order (the code keeps the first set found by its
depth-first search); the chosen groups are returned sorted.

Left out: training the chosen groups as separate multi-task networks and reading each
task's prediction from the network that serves it (the caller's), the cosine-similarity
and higher-order-approximation variants, and the HOA selection notebook (it minimises
validation losses of trained pairs instead of maximising affinity). Rows are the task
stepped on, as in the Taskonomy patch, which inverts its affinity dictionary; the CelebA
notebook stores it the other way round with no inversion. On an exact tie the official search
can return a group that serves no task (on its Taskonomy affinities at 4 groups, a fourth
group with the same score as our 3); elsewhere its selection and ours agreed on 60 random
matrices in the audit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from reference_impls.affinity.transference import LossFn, lookahead_transference
from reference_impls.checks import require_positive

Group = tuple[int, ...]


class Grouping(NamedTuple):
    groups: tuple[Group, ...]  # the networks to train, each a sorted tuple of task indices
    score: float  # mean over tasks of the best affinity onto it
    served_by: tuple[int, ...]  # for every task, the index in ``groups`` of its best network


class AffinityAverage:
    """Running mean of the K x K lookahead affinity measured during one joint training run."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def update(self, z: Tensor) -> None:
        """Add one measured matrix Z (row: task stepped on, column: task measured)."""
        z = z.detach()
        self.total = z.clone() if self.total is None else self.total + z
        self.count += 1

    def measure(self, model: nn.Module, loss_fn: LossFn, lr: float,
                shared: Sequence[str] | None = None) -> Tensor:
        """Measure Z at the model's current parameters (the lookahead of transference.py) and add it."""
        z = lookahead_transference(model, loss_fn, lr, shared)
        self.update(z)
        return z

    def mean(self) -> Tensor:
        if self.total is None:
            raise RuntimeError("no affinity measured yet")
        return self.total / self.count


def _check(affinity: Tensor) -> int:
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1] or affinity.shape[0] < 2:
        raise ValueError(f"affinity must be a K x K matrix with K >= 2, got shape {tuple(affinity.shape)}")
    if not torch.isfinite(affinity).all():
        raise ValueError("affinity must be finite")
    return affinity.shape[0]


def candidate_groups(num_tasks: int) -> list[Group]:
    """Every group of two or more tasks, smaller groups first."""
    return [g for size in range(2, num_tasks + 1) for g in itertools.combinations(range(num_tasks), size)]


def group_scores(affinity: Tensor, group: Sequence[int]) -> Tensor:
    """S(G, a) for every task a: mean of Z[b, a] over the other members b; −inf outside G."""
    k = _check(affinity)
    members = torch.tensor(sorted(group), device=affinity.device)
    if len(members) < 2:
        raise ValueError(f"a group needs at least two tasks, got {tuple(group)}")
    onto = affinity[members][:, members]  # onto[p, q] = Z[members[p], members[q]]
    own = torch.eye(len(members), dtype=torch.bool, device=affinity.device)
    sums = onto.masked_fill(own, 0).sum(0)  # column q: what the other members give task q
    out = torch.full((k,), float("-inf"), dtype=affinity.dtype, device=affinity.device)
    out[members] = sums / (len(members) - 1)
    return out


def select_groups(affinity: Tensor, num_groups: int) -> Grouping:
    """The grouping of at most ``num_groups`` overlapping groups with the highest score."""
    require_positive(num_groups=num_groups)
    k = _check(affinity)
    candidates = candidate_groups(k)
    table = torch.stack([group_scores(affinity, g) for g in candidates]).double()  # candidates x K
    best_score, best = float("-inf"), ()
    for size in range(1, min(num_groups, len(candidates)) + 1):
        for chosen in itertools.combinations(range(len(candidates)), size):
            per_task = table[list(chosen)].max(dim=0).values
            if torch.isinf(per_task).any():  # some task shares no group: not a grouping
                continue
            score = per_task.mean().item()
            if score > best_score:
                best_score, best = score, chosen
    groups = sorted(candidates[c] for c in best)
    rows = table[[candidates.index(g) for g in groups]]
    served_by = tuple(int(i) for i in rows.argmax(dim=0))
    return Grouping(tuple(groups), best_score, served_by)
