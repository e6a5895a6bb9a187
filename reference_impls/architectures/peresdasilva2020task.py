"""Deep-AMTFL whose asymmetric loss weighting acts on task-uncertainty losses, not raw losses.

Peres da Silva, Suphavilai & Nagarajan, "Task Uncertainty Loss Reduce Negative Transfer in
Asymmetric Multi-task Feature Learning", AAAI 2021 (student abstract), arXiv:2012.09575.
AMTFL (Lee et al., ICML 2018; :mod:`reference_impls.architectures.amtfl`) lets a task's
predictions feed back into the shared features, and makes the feedback asymmetric by
charging each task for its outgoing weights in proportion to its loss,
``sum_t (1 + alpha ||a_t||_1) L_t``. The abstract's point is that a task's loss value
does not necessarily say how reliable its predictor is; it proposes learning an aleatoric,
homoscedastic (one per task) uncertainty and using it to set the task losses' weights
inside AMTFL. It is an architecture here, a variant of AMTFL, not a loss weighting: the
weights read the model's feedback matrix A, which a losses-in, weights-out method cannot see.

The form here, with a learned log-variance s_t = log sigma_t^2 per task:

    U_t = exp(-s_t) L_t + s_t                        (uncertainty loss of task t)
    total = sum_t (1 + alpha ||a_t||_1) U_t + gamma ||h - h_hat||^2 + mu sum_t ||head_t||_1

A task the model finds noisy raises s_t: its loss is down-weighted by exp(-s_t), and the
price of its feedback becomes alpha U_t, which at the optimum in s_t (s_t = log L_t) is
alpha (1 + log L_t): the ordering of tasks by reliability is kept, but on a log scale
that no longer lets one large-loss task dominate. U_t turns negative for a task whose
loss falls below 1/e (at the optimal s_t); the l1 term then rewards that task's outgoing
feedback instead of charging it, held back only by the reconstruction term (the authors'
code below has the same property).

Sources and our reading. The abstract (arXiv, AAAI record) gives the idea but its method
text and equations were not available here, so no equation numbers are cited. The form
above follows the authors' later code for the same idea (github.com/CSB5/TUGDA,
``tugda_mtl_example.ipynb``, first author Peres da Silva): a learned log-variance per
task, the loss ``exp(-s_t) L_t + s_t``, and the AMTFL factor ``1 + ||a_t||_1``
multiplying that uncertainty loss. We keep AMTFL's ``alpha`` on the l1 term (that code
has none, i.e. alpha = 1).

The training harness adds :meth:`auxiliary_loss` (AMTFL's reconstruction and head
penalty) to a plain sum of task losses; the uncertainty weighting needs the task losses
and the log-variances, so :meth:`objective` takes the task losses and gives the full
training loss (``training_procedure`` says so).

Left out: the epistemic (Monte Carlo dropout) uncertainty term that the later TUGDA code
adds to the AMTFL factor, and its domain-adaptation discriminator (neither is in the
abstract); the L2 penalty of that code on the shared layers; the paper's datasets
(image recognition, cancer drug response) and its negative-transfer analysis. With those
terms off, the objective here equals the TUGDA code's (CSB5/TUGDA at a99447f) exactly, except
that TUGDA averages the reconstruction error over features where ours, inherited from AMTFL,
sums it (the same gamma weighs the feature width times more here), and that TUGDA scores the
mean of 50 dropout passes; its settings are mu 0.01 and gamma 1e-4.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .amtfl import AMTFL


class UncertaintyAMTFL(AMTFL):
    """AMTFL with a learned log-variance per task; the asymmetric weights act on U_t."""

    name = "peresdasilva2020task"
    training_procedure = ("each task's loss over a learned variance, plus that variance's log "
                          "(uncertainty_losses()), is weighted by 1 + alpha ||a_t||_1 (objective(), which needs "
                          "the task losses)")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, heads: Mapping[str, nn.Module],
                 feature_dim: int, out_dims: Mapping[str, int],
                 alpha: float = 0.1, gamma: float = 1e-2, mu: float = 1e-4):
        super().__init__(tasks, trunk, heads, feature_dim, out_dims, alpha=alpha, gamma=gamma, mu=mu)
        # s_t = log sigma_t^2, one scalar per task, 0 at the start (sigma = 1: plain AMTFL)
        self.log_variances = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    def uncertainty_losses(self, task_losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """U_t = exp(-s_t) L_t + s_t: the loss scaled by the learned precision, plus its price."""
        out = {}
        for t in self.tasks:
            s = self.log_variances[t].to(task_losses[t])
            out[t] = torch.exp(-s) * task_losses[t] + s
        return out

    def objective(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """sum_t (1 + alpha ||a_t||_1) U_t + the auxiliary terms (after a forward pass)."""
        weights = self.task_loss_weights()
        uncertain = self.uncertainty_losses(task_losses)
        return sum(weights[t] * uncertain[t] for t in self.tasks) + self.auxiliary_loss()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from super().task_specific_parameters(task)
        yield self.log_variances[task]  # only task t's uncertainty loss reads s_t
