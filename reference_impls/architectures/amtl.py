"""AMTL: every task's weights are rebuilt from the other tasks', and reliable tasks do the rebuilding.

Lee, Yang & Hwang, "Asymmetric Multi-task Learning Based on Task Relatedness and Loss",
ICML 2016 (PMLR v48, pp. 230-238; code: github.com/BlasterL/AMTL, MATLAB, by the first
author). Linear tasks with weights W = [w_1, ..., w_T] (one column per task, the bias as
a last row, as the authors' code appends a constant feature). A non-negative matrix B
with a zero diagonal is a directed graph between tasks: column t of W B,
sum_s B[s, t] w_s, rebuilds task t from the others, and row s of B, b_s^o, is everything
task s sends out. The objective (the paper's Eq. 1, its second term summed over t) is

    sum_t (1 + mu ||b_t^o||_1) L_t(w_t)  +  lam ||W - W B||_F^2,      B >= 0, diag(B) = 0

The price of an outgoing edge is the sender's loss: a task that fits its data badly pays
a lot for every unit it sends, so the l1 pressure removes its outgoing edges first, and
transfer flows from easy, well-fit tasks to hard ones, not back (the asymmetry; tested).
B is learned with W, so which task helps which is found, not given.

The defining rule comes from the authors' code (cal_loss.m, 'lasso' case: each task's
loss times 1 + its row norm of B, plus lambda ||W - W B||_F^2; learnB.m: the same row's
entries penalised by the sender's loss, then clipped at zero; run_amtl_class.m: each class
of a multi-class problem is one one-vs-rest task) and its README, and agrees with the paper's
Eq. 1. Equation numbers are those of the PMLR copy of the paper, leeb16.pdf of mlresearch/v48
(commit f0dd370): the W step is its Eq. 2, the B step, a non-negative lasso on
column t of B whose entries are weighted by the senders' losses, is its Eq. 3, and the
curriculum variant is its Eqs. 4-6.

Here a task with several outputs gives one column of W per output, as the authors' code
makes one task per class; all columns of a task are priced by that task's loss. The
diagonal of B is masked out, and :meth:`AMTL.project` clips B at zero after a gradient
step, as the authors' code does after each of its B steps (here an entry at zero can come
back when rebuilding a task gains more than the sender's loss costs; the authors' B step
never lets one come back, and zeroes one more entry every iteration); the loop calls it through
:meth:`AMTL.observe_step_losses` at the start of every step, a loop of one's own calls it
after ``optimizer.step()``. :meth:`AMTL.objective` takes the task losses and gives the whole objective. The training
harness adds only :meth:`AMTL.auxiliary_loss` to a plain combination of the losses; it is
the reconstruction term plus mu sum_t ||b_t^o||_1 L_t with the losses of the step that
:meth:`AMTL.observe_step_losses` received (detached), so B gets the paper's gradient
while W misses the loss weights (1 + mu ||b_t^o||_1). It is linear in the input, as in
the paper, so it is built for vector inputs only (ValueError for images). The defaults
mu = 1 (their c_t) and lam = 0.05 are the values in run_amtl_class.m.

Left out: the paper's solvers (alternating W and B steps, Eqs. 2-3; a curriculum that learns
one task at a time, Eqs. 4-6), the authors' rescaling of B to sum to T after each step and their
option to make c_t depend on a task's number of examples (imbalanced data), and the
experiments. Their learnW.m weights a task's loss by its column (incoming) norm of B, where
cal_loss.m and learnB.m use its row (outgoing) norm; here the row, as in the objective.
Their learnB.m also steps B[s, t] along c_s L_s^2 B[s, t] for the penalty (a ridge-like
term, squared loss times the entry), where the l1 objective that cal_loss.m evaluates, and
that its own line search compares, has the gradient c_s L_s; here the objective's gradient.
Their W and B steps use the gradient of (lam / 2) ||W - W B||², so at the same lam the
reconstruction term here pulls twice as hard, and their W starts from the single-task fits.
The paper's Algorithm 1 starts from B = 0 (and the text from independently trained tasks);
B here starts at 1/T off the diagonal, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel


class AMTL(MultiTaskModel):
    """Linear tasks (weights with the bias as a last row) and the transfer graph B between their columns."""

    name = "amtl"
    equations_checked_in = "leeb16.pdf of mlresearch/v48"
    training_procedure = ("each task's loss is weighted by 1 + mu times its outgoing transfer ||b_t^o||_1 "
                          "(objective(), which needs the task losses; the loop feeds B's share through "
                          "observe_step_losses()); the paper alternates W and B steps")

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 mu: float = 1.0, lam: float = 0.05):
        super().__init__(tasks)
        require_non_negative(mu=mu, lam=lam)
        self.weights = nn.ParameterDict({t: nn.Parameter(0.1 * torch.randn(in_dim + 1, out_dims[t]))
                                         for t in self.tasks})
        bounds = torch.tensor([0] + [out_dims[t] for t in self.tasks]).cumsum(0).tolist()
        self.columns = {t: (bounds[i], bounds[i + 1]) for i, t in enumerate(self.tasks)}  # task t's columns of W
        n = bounds[-1]
        self.graph = nn.Parameter(torch.full((n, n), 1.0 / n))  # the authors start from B = 1/T off the diagonal
        self.register_buffer("off_diagonal", 1 - torch.eye(n), persistent=False)
        self.mu, self.lam = mu, lam
        self._observed: Tensor | None = None  # the last step's detached task losses

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "AMTL":
        if problem.is_image:
            raise ValueError("AMTL is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def weight_matrix(self) -> Tensor:
        """W ((d + 1) x columns): every task's weights side by side, the bias as the last row."""
        return torch.cat([self.weights[t] for t in self.tasks], dim=1)

    def transfer(self) -> Tensor:
        """B with its diagonal masked out; B[s, t] is how much column s helps rebuild column t."""
        return self.graph * self.off_diagonal

    @torch.no_grad()
    def project(self) -> None:
        """B >= 0: clip the entries a gradient step took below zero (the authors' projection)."""
        self.graph.clamp_(min=0)

    def outgoing(self) -> dict[str, Tensor]:
        """||b_t^o||_1 per task: the l1 norms of the rows of B of the task's columns."""
        rows = self.transfer().abs().sum(dim=1)
        return {t: rows[lo:hi].sum() for t, (lo, hi) in self.columns.items()}

    def reconstruction(self) -> Tensor:
        """||W - W B||_F^2: how far each task is from its rebuild out of the others."""
        w = self.weight_matrix()
        return (w - w @ self.transfer()).square().sum()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ self.weights[t][:-1] + self.weights[t][-1] for t in self.tasks}

    def observe_step_losses(self, losses: Tensor) -> None:
        """Keep the step's task losses (in task order), detached, to price B's outgoing edges, and
        project B after the previous step (the pass's graph does not read B: safe in place)."""
        self._observed = losses.detach()
        self.project()

    def auxiliary_loss(self) -> Tensor:
        """lam ||W - W B||_F^2 + mu sum_t ||b_t^o||_1 L_t (the last observed losses; none before)."""
        aux = self.lam * self.reconstruction()
        if self._observed is None:
            return aux
        out = self.outgoing()
        return aux + self.mu * sum(out[t] * self._observed[i] for i, t in enumerate(self.tasks))

    def objective(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """sum_t (1 + mu ||b_t^o||_1) L_t + lam ||W - W B||_F^2: the paper's whole objective."""
        out = self.outgoing()
        weighted = sum((1 + self.mu * out[t]) * task_losses[t] for t in self.tasks)
        return weighted + self.lam * self.reconstruction()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.weights[task]  # B couples the tasks only through the penalty: shared
