"""Dirty model: task weights split into a block-sparse shared part and a sparse private part.

Jalali, Sanghavi, Ruan, Ravikumar, "A Dirty Model for Multi-task Learning", NeurIPS 2010
(no arXiv version). Linear tasks, weights W (d features x T tasks) written as W = B + S:

    min_{B, S}  sum_t 1/(2n) ||y_t - X_t (b_t + s_t)||^2 + lambda_b ||B||_{1,inf} + lambda_s ||S||_{1,1}

||B||_{1,inf} = sum_j max_t |B_jt| charges a feature once for all tasks (so features are
switched on for all tasks at once, with similar magnitudes: the shared part), and
||S||_{1,1} = sum_jt |S_jt| pays per entry (a feature one task uses alone). Neither pure
block sparsity (wrong when tasks share only part of their supports) nor pure entrywise
sparsity (ignores what they do share) is assumed; the data decide the split. The paper's
analysis needs 1/T < lambda_s / lambda_b < 1: outside that range one of B, S is zero.

Both penalties have exact proximal operators, so :func:`solve` runs proximal gradient
descent on (B, S) jointly (the paper solves the same convex problem; it does not
prescribe a solver):

    prox of t ||.||_1:    soft-thresholding, sign(v) max(|v| - t, 0)
    prox of t ||.||_inf:  v - (projection of v onto the l1 ball of radius t)   (Moreau),
                          applied to each row of B (Duchi et al., 2008, for the projection)

:class:`DirtyModel` is the same linear model as a module for the training harness, with
W = B + S per task (several outputs = several columns) and a bias per task;
:meth:`DirtyModel.auxiliary_loss` is the penalty. It is linear in the input, as in the
paper, so it is built for vector inputs only (ValueError for images). The paper's
equation numbers are not cited: its text was not available to check them.

Left out: the paper's support-recovery theory and its choice of the lambdas, and its
handwritten-digit experiments. MALSAR's ``Least_Dirty`` (jiayuzhou/MALSAR, a third-party
version) has no 1/(2n) in its loss, so its lambdas are 2n times ours (rescaled, its weights and
ours agreed to about 1e-15 in the audit), and it uses an accelerated solver with a line search.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel


def l1_inf_norm(b: Tensor) -> Tensor:
    """sum over rows (features) of the largest absolute entry (over tasks)."""
    return b.abs().amax(dim=1).sum()


def dirty_penalty(b: Tensor, s: Tensor, lambda_b: float, lambda_s: float) -> Tensor:
    return lambda_b * l1_inf_norm(b) + lambda_s * s.abs().sum()


def soft_threshold(v: Tensor, t: float) -> Tensor:
    """prox of t ||.||_1."""
    return v.sign() * (v.abs() - t).clamp_min(0)


def project_rows_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of ``v`` onto {x: ||x||_1 <= radius} (sort-based)."""
    a = v.abs()
    inside = a.sum(dim=1, keepdim=True) <= radius
    sorted_a = a.sort(dim=1, descending=True).values
    cumsum = sorted_a.cumsum(dim=1)
    k = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    active = sorted_a - (cumsum - radius) / k > 0  # true for the first rho entries
    rho = active.sum(dim=1, keepdim=True).clamp_min(1)
    theta = ((cumsum.gather(1, rho - 1) - radius) / rho).clamp_min(0)
    projected = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside, v, projected)


def prox_rows_linf(v: Tensor, t: float) -> Tensor:
    """prox of t ||row||_inf for each row, by Moreau: v - projection onto the l1 ball of radius t."""
    return v - project_rows_l1_ball(v, t)


def squared_loss(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor) -> Tensor:
    return sum(((y - x @ w[:, t]) ** 2).sum() / (2 * len(y)) for t, (x, y) in enumerate(zip(xs, ys)))


def solve(xs: Sequence[Tensor], ys: Sequence[Tensor], lambda_b: float, lambda_s: float,
          iterations: int = 500) -> tuple[Tensor, Tensor]:
    """Proximal gradient on (B, S): one gradient step on the shared loss, then each prox."""
    d, tasks = xs[0].shape[1], len(xs)
    b = xs[0].new_zeros(d, tasks)
    s = xs[0].new_zeros(d, tasks)
    # the loss depends on B + S: its Lipschitz constant in (B, S) is twice that in W
    lipschitz = 2 * max(torch.linalg.matrix_norm(x, 2).item() ** 2 / len(x) for x in xs)
    step = 1.0 / lipschitz
    for _ in range(iterations):
        w = b + s
        grad = torch.stack([x.T @ (x @ w[:, t] - y) / len(y) for t, (x, y) in enumerate(zip(xs, ys))], dim=1)
        b = prox_rows_linf(b - step * grad, step * lambda_b)
        s = soft_threshold(s - step * grad, step * lambda_s)
    return b, s


class DirtyModel(MultiTaskModel):
    """Linear tasks with W = B + S; the dirty penalty as the auxiliary loss."""

    name = "dirty_model"

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 lambda_b: float = 1e-3, lambda_s: float = 5e-4):
        super().__init__(tasks)
        self.shared = nn.ParameterDict({t: nn.Parameter(torch.zeros(in_dim, out_dims[t])) for t in self.tasks})
        self.private = nn.ParameterDict({t: nn.Parameter(torch.zeros(in_dim, out_dims[t])) for t in self.tasks})
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        self.lambda_b, self.lambda_s = lambda_b, lambda_s

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "DirtyModel":
        if problem.is_image:
            raise ValueError("the dirty model is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def b_matrix(self) -> Tensor:
        return torch.cat([self.shared[t] for t in self.tasks], dim=1)

    def s_matrix(self) -> Tensor:
        return torch.cat([self.private[t] for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """lambda_b ||B||_{1,inf} + lambda_s ||S||_{1,1} (from the parameters; no forward needed)."""
        return dirty_penalty(self.b_matrix(), self.s_matrix(), self.lambda_b, self.lambda_s)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ (self.shared[t] + self.private[t]) + self.biases[t] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # B's columns are coupled only through the penalty; each task's output reads its own
        yield from (self.shared[task], self.private[task], self.biases[task])
