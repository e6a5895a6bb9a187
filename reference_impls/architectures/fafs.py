"""Fully-adaptive feature sharing: widen a thin shared network top-down, one junction at a time.

Lu, Kumar, Zhai, Cheng, Javidi, Feris, "Fully-Adaptive Feature Sharing in Multi-Task
Networks with Applications in Person Attribute Classification", CVPR 2017, arXiv:1611.05377.

Training starts from a thin network whose layers are all shared, with one output branch per
task. The top-down widening step (the paper's Sec. 3.2) then works on the "active" layer,
the highest layer that is still shared: the branches that meet above it are clustered into
d groups, the active layer is copied d times (each copy starts with exactly the old weights,
so the network computes the same function right after the split, tested) and each group's
branches are re-attached to their own copy. Training continues and the layer below becomes
active. The choice of groups (the paper's Sec. 3.3) rests on:

* task affinity: tasks are related when their examples are easy or hard together,
  A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0) with e_i the "hard example for task i"
  indicator, estimated over examples (:func:`task_affinity`);
* branch affinity, for branches k and l serving several tasks: the mean over tasks of k of
  their least affine task in l, averaged over both directions (:func:`branch_affinity`);
* a grouping loss that trades the cost of more branches against keeping unrelated branches
  together: L(g_d) = (d - 1) * L0 * 2^p + lambda * (1/d) sum_k (1 - A_k), where p counts
  the pooling layers above the junction (a branch there is that much wider) and A_k is the
  group's within affinity, the mean over its branches of the least affine other member
  (:func:`grouping_loss`, :func:`best_grouping`).

:class:`FullyAdaptiveFeatureSharing` is a :class:`~.bmtn.BranchedMultiTaskNetwork` (the same
tree of layer copies) with the widening operation; its default is the thin start, every
layer shared.

Left out: the thin-model initialisation from a pre-trained wide network by simultaneous
orthogonal matching pursuit (layers start from the usual random init), the running-average
estimate of the hard-example indicators during training (they are computed from a batch of
losses: "hard" means a loss above that task's mean) and the paper's VGG-16 backbone.
Candidate groupings come from agglomerative (complete-linkage) clustering of the branch
affinities, one per d; the grouping loss picks among them. The authors' code uses spectral
clustering (5 restarts) instead, caps the branches a layer can get, retries a layer later
when no split wins (here the search moves down), measures hard examples on the per-example
error rather than the loss, and costs a new branch 1/64 * 2^p with lambda 1 (lambda = 64 here
in those units).
Checked in the audit: the authors' code (luyongxi/deep_share, ``classification_sw.py``) takes
a group's minimum affinity over all its members, the branch itself included, so a lone
branch serving several tasks pays 1 minus its self-affinity; here the least affine *other*
member counts and a singleton group pays 0. The two agree whenever each branch serves one
task; the paper's text was not available to settle it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from .bmtn import BranchedMultiTaskNetwork, Partition, _key
from .encoders import heads_for, trunk_for
from .registry import Problem


def hard_examples(losses: Tensor) -> Tensor:
    """N x T indicators e_i: the example's loss on task i is above task i's mean."""
    return losses > losses.mean(dim=0, keepdim=True)


def task_affinity(hard: Tensor) -> Tensor:
    """T x T: fraction of examples that are hard for both tasks or easy for both."""
    e = hard.to(torch.get_default_dtype())
    return (e.T @ e + (1 - e).T @ (1 - e)) / e.shape[0]


def branch_affinity(affinity: Tensor, branches: Sequence[Sequence[int]]) -> Tensor:
    """B x B: mean over tasks in k of their minimum affinity to tasks in l, symmetrised."""
    n = len(branches)
    one_way = torch.empty(n, n, dtype=affinity.dtype, device=affinity.device)
    for k, l in itertools.product(range(n), repeat=2):
        one_way[k, l] = affinity[list(branches[k])][:, list(branches[l])].min(dim=1).values.mean()
    return (one_way + one_way.T) / 2


def within_affinity(branch_aff: Tensor, group: Sequence[int]) -> float:
    """Mean over the group's branches of their least affine other member (1 for a singleton)."""
    if len(group) < 2:
        return 1.0
    sub = branch_aff[list(group)][:, list(group)]
    off = sub + torch.diag(torch.full((len(group),), torch.inf, dtype=sub.dtype, device=sub.device))
    return off.min(dim=1).values.mean().item()


def grouping_loss(
    branch_aff: Tensor, grouping: Sequence[Sequence[int]], lam: float, pools_above: int = 0,
    unit_cost: float = 1.0,
) -> float:
    """(d - 1) * L0 * 2^p (new branches) + lambda * mean over groups of 1 - within affinity."""
    d = len(grouping)
    complexity = (d - 1) * unit_cost * 2**pools_above
    separation = sum(1.0 - within_affinity(branch_aff, g) for g in grouping) / d
    return complexity + lam * separation


def agglomerative_groupings(branch_aff: Tensor) -> list[list[list[int]]]:
    """Candidate groupings for d = B, B - 1, ..., 1 by complete-linkage merging."""
    groups = [[b] for b in range(branch_aff.shape[0])]
    out = [copy.deepcopy(groups)]
    while len(groups) > 1:
        def link(pair: tuple[int, int]) -> float:
            return branch_aff[groups[pair[0]]][:, groups[pair[1]]].min().item()
        a, b = max(itertools.combinations(range(len(groups)), 2), key=link)
        groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [groups[a] + groups[b]]
        out.append(copy.deepcopy(groups))
    return out


def best_grouping(branch_aff: Tensor, lam: float, pools_above: int = 0) -> list[list[int]]:
    """The candidate grouping with the lowest grouping loss."""
    return min(agglomerative_groupings(branch_aff), key=lambda g: grouping_loss(branch_aff, g, lam, pools_above))


class FullyAdaptiveFeatureSharing(BranchedMultiTaskNetwork):
    """A branched tree that grows by :meth:`widen`; starts with every layer shared."""

    name = "fafs"
    training_procedure = ("the thin all-shared network is widened top-down during training, one junction at a time, "
                          "by widen_by_affinity() from the tasks' per-example losses")

    @classmethod
    def from_problem(
        cls, problem: Problem, width: int = 32, depth: int = 2, tree: Sequence[Partition] | None = None
    ) -> "FullyAdaptiveFeatureSharing":
        layers = list(trunk_for(problem.input_shape, width, depth).blocks)
        tree = tree or [(tuple(problem.tasks),)] * depth  # the thin start: one shared column
        return cls(problem.tasks, layers, tree, heads_for(problem, width))

    def branches_above(self, layer: int) -> Partition:
        """The branches meeting on top of ``layer`` (the task heads above the last layer)."""
        return self.tree[layer + 1] if layer + 1 < len(self.tree) else tuple((t,) for t in self.tasks)

    def active_layer(self) -> int | None:
        """The layer the next widening splits: the top one first, then one lower per step."""
        active = getattr(self, "_active", len(self.tree) - 1)
        return active if active >= 0 else None

    @torch.no_grad()
    def widen(self, layer: int, grouping: Sequence[Sequence[int]]) -> None:
        """Split ``layer``: one copy of its module per group of the branches above it.

        ``grouping`` holds indices into :meth:`branches_above`. Each copy starts from the
        weights of the module it replaces, so the outputs do not change.
        """
        above = self.branches_above(layer)
        new_groups = [tuple(t for b in g for t in above[b]) for g in grouping]
        if sorted(t for g in new_groups for t in g) != sorted(self.tasks):
            raise ValueError(f"grouping {grouping} does not cover the {len(above)} branches above layer {layer}")
        old = self.tree[layer]
        for group in new_groups:
            if not any(set(group) <= set(o) for o in old):
                raise ValueError(f"group {group} would join tasks split below layer {layer}")
        for group in new_groups:
            source = next(o for o in old if set(group) <= set(o))
            self.branches[_key(layer, group)] = copy.deepcopy(self.branches[_key(layer, source)])
        for o in old:
            if o not in new_groups:
                del self.branches[_key(layer, o)]
        self.tree = (*self.tree[:layer], tuple(new_groups), *self.tree[layer + 1 :])
        self._active = layer - 1  # widening moves down one layer, split or not

    def widen_by_affinity(
        self, losses: Tensor, lam: float, layer: int | None = None, pools_above: int = 0
    ) -> list[list[int]]:
        """One widening step at ``layer`` (default: the active one) from N x T ``losses``.

        Each junction (a group of ``layer``) is clustered on its own; the returned grouping
        indexes :meth:`branches_above`.
        """
        layer = self.active_layer() if layer is None else layer
        if layer is None:
            raise ValueError("every layer is already fully split")
        above = self.branches_above(layer)
        aff = task_affinity(hard_examples(losses))
        index = {t: i for i, t in enumerate(self.tasks)}
        grouping: list[list[int]] = []
        for junction in self.tree[layer]:
            members = [b for b, br in enumerate(above) if set(br) <= set(junction)]
            b_aff = branch_affinity(aff, [[index[t] for t in above[b]] for b in members])
            grouping += [[members[i] for i in g] for g in best_grouping(b_aff, lam, pools_above)]
        self.widen(layer, grouping)
        return grouping
