"""Negative-transfer identification with a linear surrogate of multi-task performance.

Li, Nguyen, Zhang, "Identification of Negative Transfers in Multitask Learning Using
Surrogate Models", TMLR 2023, arXiv:2303.14582. Equations are named, not numbered: the
paper's numbering could not be checked here.

Which of k source tasks should be trained with a target task? Trying all 2^k subsets is
out of reach, so the paper learns a cheap surrogate of the answer:

1. sample n random subsets S_1 … S_n of the source tasks and, for each, train a multi-task
   model on S_i ∪ {target} and record the target's validation loss f(S_i);
2. fit a linear model of the subset's indicator vector 1_S ∈ {0, 1}^k by least squares,

       f(S) ≈ g_θ(S) = b + Σ_{j ∈ S} θ_j ,

   which also predicts f on subsets never trained;
3. θ_j is source task j's relevance score: with a loss, θ_j > 0 means adding task j tends to
   raise the target's loss (negative transfer), θ_j < 0 that it helps. The selected subset
   is {j : θ_j < γ} for a threshold γ (0 by default: every task the surrogate says helps).

The paper shows that n linear in k suffices to fit g_θ. If every sampled subset has the same
size s, the columns of the design sum to s times the intercept column and only the
differences θ_i − θ_j (and every prediction) are identified; least squares then returns the
minimum-norm θ. Sample several sizes (or fix b) when absolute scores matter.

Sources: subset sampling with sizes drawn uniformly between a minimum and a maximum
follows the official code's README (VirtuosoResearch ``Task-Modeling``: ``--min_task_num``,
``--max_task_num``); the threshold search over γ is reduced to a given γ here.

Left out: training the multi-task models that produce f(S_i) (the caller's, and the
expensive part), the choice of γ by optimising the surrogate, the official sampler's
skipping of subsets already drawn (``sample_subsets`` may repeat one), and the
weak-supervision and NLP benchmarks. The released code holds the sampling and training
scripts only; the surrogate fit and selection here follow the paper. Its NLP sampler counts
the target task in the subset size (only the weak-supervision sampler draws the README's
"number of source tasks"), and the README's own example draws fixed-size subsets, the case
in which, as noted above, only differences of the scores are identified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.checks import require_positive


def sample_subsets(num_tasks: int, num_samples: int, min_size: int, max_size: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """n x k boolean masks: a size uniform in [min_size, max_size], then a uniform subset of it."""
    if not 1 <= min_size <= max_size <= num_tasks:
        raise ValueError(f"need 1 <= min_size <= max_size <= num_tasks, got {min_size}, {max_size}, {num_tasks}")
    require_positive(num_samples=num_samples)
    sizes = torch.randint(min_size, max_size + 1, (num_samples,), generator=generator)
    order = torch.rand(num_samples, num_tasks, generator=generator).argsort(dim=1)
    ranks = order.argsort(dim=1)  # each row: a random permutation of 0..k-1
    return ranks < sizes[:, None]


def design(masks: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """[1, 1_S]: an intercept column followed by the subset indicators."""
    ones = torch.ones(masks.shape[0], 1, dtype=dtype, device=masks.device)
    return torch.cat([ones, masks.to(dtype)], dim=1)


class SurrogateModel:
    """Least-squares fit of f(S) ≈ b + Σ_{j∈S} θ_j; θ are the relevance scores."""

    name = "surrogate_negative_transfer"

    def __init__(self) -> None:
        self.bias: Tensor | None = None
        self.theta: Tensor | None = None

    def fit(self, masks: Tensor, performance: Tensor) -> "SurrogateModel":
        x = design(masks, torch.float64)
        y = performance.to(torch.float64).reshape(-1, 1)
        # pinv gives the minimum-norm solution, also when the sizes are all equal (rank k)
        coef = (torch.linalg.pinv(x) @ y).squeeze(1)
        self.bias, self.theta = coef[0], coef[1:]
        return self

    def predict(self, masks: Tensor) -> Tensor:
        if self.theta is None:
            raise RuntimeError("fit the surrogate first")
        return self.bias + masks.to(torch.float64) @ self.theta

    def select(self, threshold: float = 0.0, higher_is_better: bool = False) -> Tensor:
        """Indices of the source tasks kept: θ_j < γ for a loss, θ_j > γ for a score."""
        if self.theta is None:
            raise RuntimeError("fit the surrogate first")
        if threshold != threshold:  # NaN: nothing compares true, so every task would be dropped
            raise ValueError(f"threshold must be a number, got {threshold}")
        keep = self.theta > threshold if higher_is_better else self.theta < threshold
        return keep.nonzero().squeeze(1)

    def negative_transfers(self, threshold: float = 0.0, higher_is_better: bool = False) -> Tensor:
        """The complement of ``select``: source tasks predicted to hurt the target."""
        kept = set(self.select(threshold, higher_is_better).tolist())
        return torch.tensor([j for j in range(len(self.theta)) if j not in kept], dtype=torch.long)
