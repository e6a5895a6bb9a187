"""GO4Align: group-based task weighting with a risk-guided indicator.

Shen, Wang, Xiao, Van Noord, Worring, "GO4Align: Group Optimization for Multi-Task
Alignment", NeurIPS 2024, arXiv:2404.06486.

GO4Align is a loss-oriented method: it only looks at the task losses, never at gradients.
It aligns the tasks' progress in two steps each iteration, as in the authors' code
(``methods/cluster_methods.py``, class ``GO4ALIGN``):

1. a risk-guided indicator per task. A distribution p over tasks is updated with an
   exponentiated step on the losses, p_k <- p_k exp(-η L_k) / Z (η small, 1e-4), and
   combined with a scale that grows as a task's loss shrinks relative to the others,
   s_k = (Σ_j L_j) / L_k:   γ_k = s_k p_k;
2. dynamical group assignment. The K indicators are clustered into M groups (k-means
   on the scalar γ_k); every task takes the mean indicator of its group as its weight.
   Tasks whose indicators agree are thus optimised as one group with one weight,
   and M = 1 gives every task the mean indicator.

The training loop minimises Σ_k w_k L_k with the detached weights.

Our clustering: optimal 1-D k-means, found exactly by trying every split of the
sorted indicators into M contiguous runs (optimal 1-D clusters are always contiguous).
This is deterministic, where the authors call a randomly initialised k-means; both target
the same objective (in the audit, every disagreement with their single random start had a
worse fit on their side). In their released code the k-means import is commented out, so any
run with two or more groups stops with a NameError; only the default of one group runs. M larger than K is taken as K: every task is its own group and keeps
its indicator. Zero losses are clamped to a small floor so s_k stays finite.

Defaults: η = 1e-4 is the authors' (``robust_step_size=0.0001``). M = 2 is ours: the authors'
``GO4ALIGN`` takes ``num_groups`` without a default, and their NYUv2 trainer's
``--num_groups`` defaults to 1 (``experiments/nyuv2/trainer.py``; the README runs it so), which
gives every task the mean indicator, i.e. equal weights up to scale. M = 2 is the smallest
number of groups at which the grouping acts at all (pinned by a test).

Left out: the paper's alternative group assignments (spectral / SDP clustering in the
authors' code), and its analysis of the grouping as group risk minimisation; the
paper's equation numbers were not checked against its text (the rule above follows the
authors' code).
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class GO4Align(LossWeighting):
    """Risk-guided indicators γ_k = (ΣL / L_k) p_k, averaged within M 1-D k-means groups."""

    name = "go4align"

    def __init__(self, num_tasks: int, num_groups: int = 2, step_size: float = 1e-4,
                 loss_floor: float = 1e-12) -> None:
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self.step_size = step_size
        self.loss_floor = loss_floor
        self.register_buffer("probs", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    def indicators(self, losses: Tensor) -> Tensor:
        """Update p with the exponentiated step and return γ = s · p (float64)."""
        losses = losses.detach().to(torch.float64).clamp_min(self.loss_floor)
        probs = self.probs.to(losses.device) * torch.exp(-self.step_size * losses)
        self.probs = probs / probs.sum()
        scale = losses.sum() / losses  # s_k: large for a task already ahead
        return scale * self.probs

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        gamma = self.indicators(losses)
        return group_means(gamma, min(self.num_groups, len(gamma))).to(losses.dtype)


def group_means(values: Tensor, groups: int) -> Tensor:
    """Each value replaced by its cluster's mean under the optimal 1-D k-means with ``groups``."""
    order = torch.argsort(values)
    ordered = values[order]
    k = len(values)
    best_cost, best_cuts = None, ()
    for cuts in combinations(range(1, k), groups - 1):
        runs = torch.tensor_split(ordered, list(cuts))
        cost = sum(float(((r - r.mean()) ** 2).sum()) for r in runs)
        if best_cost is None or cost < best_cost:
            best_cost, best_cuts = cost, cuts
    means = torch.cat([r.mean().expand(len(r)) for r in torch.tensor_split(ordered, list(best_cuts))])
    result = torch.empty_like(values)
    result[order] = means
    return result
