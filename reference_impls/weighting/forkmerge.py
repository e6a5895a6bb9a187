"""ForkMerge: train forked branches with different auxiliary weights, merge by validation.

Jiang, Chen, Pan, Wang, Liu, Jiang, Long, "ForkMerge: Mitigating Negative Transfer in
Auxiliary-Task Learning", NeurIPS 2023, arXiv:2301.12618.

Auxiliary tasks can help or hurt a target task, and which one changes during training.
ForkMerge does not weigh gradients; it weighs *models*. Every Δt steps the current
parameters θ are forked into B branches; branch b trains on the target loss plus its own
weighting of the auxiliary losses (branch 0 usually on the target alone). At the merge, the
branches are combined as θ = Σ_b Λ_b θ_b with the mixture weights Λ (on the simplex)
that give the lowest target-task validation loss, and all branches restart from it.

Search of Λ: the greedy merging of the authors' code (``forkmerge.py``, ``--alphas``). The
branches are ranked by their own validation loss and Λ starts one-hot on the best; each
next branch b in that order (the i-th added, i = 1, 2, ...) gets the raw weight
λ_b = α · (Σ λ so far) / i for the α in a grid that minimises the validation loss of
Σ_b λ_b θ_b / Σ_b λ_b. So a branch joins with at most the mean weight of those already
merged (at most 1/2 for the second, 1/3 for the third, ...). The grid must contain 0
(keep the merge so far), so the chosen merge is never worse on validation than the best
branch alone; the default grid is the authors' (0, 0.2, ..., 1).
A branch joins only if it strictly lowers the validation loss: among tied α the first in the
grid wins, so a flat loss leaves Λ on the best branch.

Interface: parameters are flat vectors; ``grad(θ, task_weights)`` returns the gradient of
Σ_k task_weights_k L_k at θ and ``validation_loss(θ)`` the target loss on held-out data.
With one branch ForkMerge is plain gradient descent on that branch's weighting.

Not a LossWeighting or GradientMethod (it acts on whole models), so the weighting
registry does not list it. Left out: the pruning strategy (ranking auxiliary tasks by a
short joint training, Sec. 4.2), learning-rate schedules, model-specific state such as
batch-norm statistics, and the authors' use of each branch's best validation checkpoint so
far in the run (its best score is never reset at a merge, so the checkpoint can predate the
last one; here a branch is its last iterate); equation numbers were not checked, and the
appendix's text was not available to compare with the code. Also in the authors' code
(thuml/ForkMerge, branch develop, at 37fd2ef; the merge itself agreed to 3e-16 on 300 random
cases in the audit): branches are ranked and merged by a validation metric rather than the
loss, each branch's optimizer momentum persists across merges, DomainNet's branch "weights"
are task-sampling probabilities, and the interval is whole epochs (30 in its NYUv2 script).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GradientFn = Callable[[Tensor, Tensor], Tensor]
ValidationFn = Callable[[Tensor], float]


class ForkMerge:
    """Branches with fixed task weightings, merged every ``merge_every`` steps."""

    name = "forkmerge"

    def __init__(self, branch_weights: Sequence[Sequence[float]], merge_every: int = 10,
                 alphas: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), lr: float = 0.1) -> None:
        if not branch_weights:
            raise ValueError("need at least one branch")
        if 0.0 not in alphas:
            raise ValueError("the α grid must contain 0 (keep the current merge)")
        self.branch_weights = [torch.as_tensor(w, dtype=torch.float64) for w in branch_weights]
        self.merge_every = merge_every
        self.alphas = tuple(float(a) for a in alphas)
        self.lr = lr

    def merge(self, branches: Sequence[Tensor], validation_loss: ValidationFn) -> tuple[Tensor, Tensor]:
        """Ranked greedy search of Λ; returns the merged θ and Λ (sums to 1, branch order)."""
        alone = [validation_loss(branch) for branch in branches]  # each branch's own loss, once
        order = sorted(range(len(branches)), key=alone.__getitem__)
        raw = torch.zeros(len(branches), dtype=torch.float64)
        raw[order[0]] = 1.0
        best = alone[order[0]]

        def mixture(weights: Tensor) -> Tensor:
            share = weights / weights.sum()
            return sum(float(share[b]) * branches[b] for b in range(len(branches)))

        for i, b in enumerate(order[1:], start=1):
            bound, chosen = float(raw.sum()) / i, 0.0  # the mean raw weight merged so far
            for alpha in self.alphas:
                trial = raw.clone()
                trial[b] = alpha * bound
                loss = validation_loss(mixture(trial))
                if loss < best:
                    best, chosen = loss, alpha * bound
            raw[b] = chosen
        mix = raw / raw.sum()
        return mixture(raw), mix

    def train_branch(self, theta: Tensor, weights: Tensor, grad: GradientFn) -> Tensor:
        """``merge_every`` steps of gradient descent on one branch's weighted loss."""
        for _ in range(self.merge_every):
            theta = theta - self.lr * grad(theta, weights.to(theta))
        return theta

    def run(self, theta: Tensor, grad: GradientFn, validation_loss: ValidationFn,
            rounds: int) -> tuple[Tensor, list[Tensor]]:
        """Fork, train, merge ``rounds`` times; returns θ and the Λ of every merge."""
        history = []
        for _ in range(rounds):
            branches = [self.train_branch(theta, w, grad) for w in self.branch_weights]
            theta, mix = self.merge(branches, validation_loss)
            history.append(mix)
        return theta, history
