"""PCGrad: project each task gradient off the normal plane of the gradients it conflicts with.

Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, arXiv:2001.06782,
Algorithm 1. For every task i, starting from g_i^PC = g_i (line 2), visit the other tasks j
in a random order (line 4); whenever g_i^PC · g_j < 0 (a conflict, line 5), remove the
component along g_j:

    g_i^PC <- g_i^PC − (g_i^PC · g_j / ||g_j||²) g_j        (Algorithm 1, line 7)

The projections use the *original* g_j. The update is Σ_i g_i^PC (line 8). The paper's main
text numbers no equations; for K = 2 with a conflict the result is its Eq. 7 (App. A.4),

    g^PC = (1 − g_1 · g_2 / ||g_1||²) g_1 + (1 − g_1 · g_2 / ||g_2||²) g_2,          (Eq. 7)

which ``coefficients`` uses directly for two tasks.

Every g_i^PC stays a linear combination of the original rows, so we track its coefficient
vector a_i (g_i^PC = a_iᵀ G); each inner product then comes from the Gramian:
g_i^PC · g_j = (a_iᵀ M)_j. The update is (Σ_i a_i)ᵀ G, i.e. weights Σ_i a_i.
Task i only ever projects off *original* rows, so the K sequences are independent: step s
of Algorithm 1 runs for every i at once (K − 1 vectorised steps, not K(K − 1) scalar ones).
Convention: *sum* of the projected gradients (as in the paper); with no conflicts the
weights are all 1. ``random_order=False`` visits j = 0, 1, ..., K-1 skipping i
(deterministic, for tests); the paper's App. H found a fixed order worse than a random one
on MT50.

Checked against the authors' TensorFlow code (github.com/tianheyu927/PCGrad, ``PCGrad_tf.py``),
which agrees on the projection off the original g_j and on the sum, but departs from
Algorithm 1 where we keep to the paper: its shuffle of the losses drops its result (that
repository's issue #3), so every task visits all K tasks in index order, i itself included;
visiting i projects g_i^PC off g_i whenever earlier projections turned it against g_i, which
changes the update in about 6 % of random Gaussian 4-task, 3-D cases. LibMTL's PCGrad
(``LibMTL/weighting/PCGrad.py``) also shuffles range(K) with i itself in it (a comparison on
2-4 tasks differed in 51 of 248 cases, and agreed to 4.5e-7 once the self-visit was
skipped); it uses shared-parameter gradients only. The authors' TensorFlow code's rows are
the gradients of every variable it is given, heads included, so a head's norm enters
||g_j||²; here the caller picks the rows (the training harness passes shared-parameter
gradients, which is what the paper's Sec. 3 and App. C apply PCGrad to). The TensorFlow
code has no guard for a zero g_j; here a zero row is never projected off (nor is it in
Algorithm 1: g_i^PC · 0 < 0 never holds).

Equation numbers were checked in a Markdown conversion of arXiv:2001.06782v4 (arXiv's HTML
page) in the GitHub file index (index id 66210239600).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import solver_dtype


def visiting_order(task: int, num_tasks: int, generator: torch.Generator | None) -> list[int]:
    """The other tasks, shuffled by ``generator`` (or in index order when it is None)."""
    others = [j for j in range(num_tasks) if j != task]
    if generator is None:
        return others
    perm = torch.randperm(len(others), generator=generator, device=generator.device).tolist()
    return [others[p] for p in perm]


class PCGrad(GramianWeighting):
    """Sum of the conflict-projected task gradients (Algorithm 1 of the paper)."""

    name = "pcgrad"

    def __init__(self, random_order: bool = True, generator: torch.Generator | None = None) -> None:
        if random_order and generator is None:
            generator = torch.Generator().manual_seed(0)  # own seeded RNG, no global state
        self.generator = generator if random_order else None

    def coefficients(self, gramian: Tensor) -> Tensor:
        """K x K matrix A with g_i^PC = Σ_j A_ij g_j (row i: task i after its projections)."""
        gram = gramian.to(solver_dtype(gramian.device))
        k = len(gram)
        coefficients = torch.eye(k, dtype=gram.dtype, device=gram.device)
        diagonal = gram.diagonal()
        inverse_norm_sq = torch.where(diagonal > 0, 1 / diagonal, 0)  # a conflict implies ||g_j|| > 0
        if k == 2:  # one other task each: no order to draw (randperm(1) consumes no randomness)
            shifts = (-gram[0, 1]).clamp_min(0) * inverse_norm_sq  # A_01 = shifts[1], A_10 = shifts[0]
            return coefficients + torch.diag(shifts).flip(0)
        orders = torch.tensor([visiting_order(i, k, self.generator) for i in range(k)], dtype=torch.long)
        rows = torch.arange(k, device=gram.device)
        for j in orders.reshape(k, k - 1).to(gram.device).T:  # j[i]: the task i visits at this step
            dot = (coefficients @ gram)[rows, j]  # g_i^PC · g_{j_i}
            coefficients.index_put_((rows, j), -dot.clamp_max(0) * inverse_norm_sq[j], accumulate=True)
        return coefficients

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return self.coefficients(gramian).sum(0).to(gramian.dtype)
