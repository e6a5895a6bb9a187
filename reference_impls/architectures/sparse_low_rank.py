"""Incoherent sparse and low-rank patterns: task weights W = P + Q, P sparse, Q low-rank.

Chen, Liu & Ye, "Learning Incoherent Sparse and Low-Rank Patterns from Multiple Tasks",
ACM TKDD 5(4), 2012, doi:10.1145/2086737.2086742 (no arXiv version). Linear tasks with
weights W (d features x T tasks). Most tasks are assumed to share a low-dimensional
subspace (the low-rank part Q); a few task-specific quirks that do not fit it sit in a
sparse part P. The convex surrogate the paper solves is

    min_{P, Q}  sum_t 1/(2n) ||y_t - X_t (p_t + q_t)||^2 + gamma ||P||_1
    s.t.        ||Q||_* <= tau

(l1 norm of the entries of P; trace norm, the sum of singular values, bounds Q). The
paper solves it by projected gradient; both steps are exact:

    P:  soft-thresholding, sign(v) max(|v| - step gamma, 0)     (prox of the l1 term)
    Q:  projection onto {||Q||_* <= tau}: SVD, then project the singular values onto the
        l1 ball of radius tau (they are non-negative, so this is a capped shift)

:func:`solve` runs these steps on (P, Q) jointly: both take their gradient step from the same
W = P + Q, with step size 1 / (2 max_t ||X_t||_2^2 / n_t), one over the Lipschitz constant of the
loss's gradient in (P, Q). The MALSAR toolbox's Least_SparseTrace
(jiayuzhou/MALSAR, by Zhou, Chen and Ye) solves the same problem without the 1/n: each
task's loss is its plain sum of squared errors (the header writes 0.5 ||.||^2, the gradient
is that of ||.||^2), and it takes accelerated projected-gradient steps with a line search.
The paper's equation numbers are not cited: its text was not available to check them.

:class:`SparseLowRank` is the same linear model as a module for the training harness; a
gradient-trained module cannot hold a constraint, so :meth:`SparseLowRank.auxiliary_loss`
uses the penalised (Lagrangian) form gamma ||P||_1 + beta ||Q||_*. It is linear in the
input, as in the paper, so it is built for vector inputs only (ValueError for images).

Left out: the paper's accelerated variant and its step-size search, losses other than the
square loss in the solver, and its experiments. MALSAR's sparse step (Solve_OneNorm.m) is not
exact soft-thresholding (it zeroes entries up to twice the threshold: [0, 0, 1.5, 0] where
soft-thresholding gives [0, 0.5, 1.5, -0.5]); ours is the exact step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .dirty_model import project_rows_l1_ball, soft_threshold, squared_loss
from .trace_norm import nuclear_norm


def project_trace_norm_ball(v: Tensor, tau: float) -> Tensor:
    """Euclidean projection of the matrix ``v`` onto {Q : ||Q||_* <= tau}."""
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    s = project_rows_l1_ball(s[None], tau)[0]
    return (u * s) @ vh


def solve(xs: Sequence[Tensor], ys: Sequence[Tensor], gamma: float, tau: float,
          iterations: int = 500) -> tuple[Tensor, Tensor]:
    """Projected (proximal) gradient on (P, Q): one gradient step, then each exact step."""
    d, tasks = xs[0].shape[1], len(xs)
    p, q = xs[0].new_zeros(d, tasks), xs[0].new_zeros(d, tasks)
    step = 1.0 / (2 * max(torch.linalg.matrix_norm(x, 2).item() ** 2 / len(x) for x in xs))  # loss of P + Q
    for _ in range(iterations):
        w = p + q
        grad = torch.stack([x.T @ (x @ w[:, t] - y) / len(y) for t, (x, y) in enumerate(zip(xs, ys))], dim=1)
        p = soft_threshold(p - step * grad, step * gamma)
        q = project_trace_norm_ball(q - step * grad, tau)
    return p, q


def objective(xs: Sequence[Tensor], ys: Sequence[Tensor], p: Tensor, q: Tensor, gamma: float) -> Tensor:
    """The loss plus gamma ||P||_1 (the trace norm enters as the constraint)."""
    return squared_loss(xs, ys, p + q) + gamma * p.abs().sum()


class SparseLowRank(MultiTaskModel):
    """Linear tasks with W = P + Q; gamma ||P||_1 + beta ||Q||_* as the auxiliary loss."""

    name = "sparse_low_rank"

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 gamma: float = 5e-4, beta: float = 1e-3):
        super().__init__(tasks)
        self.sparse = nn.ParameterDict({t: nn.Parameter(torch.zeros(in_dim, out_dims[t])) for t in self.tasks})
        self.low_rank = nn.ParameterDict({
            t: nn.Parameter(0.01 * torch.randn(in_dim, out_dims[t])) for t in self.tasks})  # svd needs no ties
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        self.gamma, self.beta = gamma, beta

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "SparseLowRank":
        if problem.is_image:
            raise ValueError("this is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def p_matrix(self) -> Tensor:
        return torch.cat([self.sparse[t] for t in self.tasks], dim=1)

    def q_matrix(self) -> Tensor:
        return torch.cat([self.low_rank[t] for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """gamma ||P||_1 + beta ||Q||_* (from the parameters; no forward needed)."""
        return self.gamma * self.p_matrix().abs().sum() + self.beta * nuclear_norm(self.q_matrix())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ (self.sparse[t] + self.low_rank[t]) + self.biases[t] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Q's columns are coupled only through the trace norm; each task's output reads its own
        yield from (self.sparse[task], self.low_rank[task], self.biases[task])
