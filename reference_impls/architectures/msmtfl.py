"""MSMTFL: capped-l1,l1 multi-task feature selection, solved by a sequence of reweighted lassos.

Gong, Ye & Zhang, "Multi-Stage Multi-Task Feature Learning", NeurIPS 2012 (extended in
JMLR 14, 2013, pp. 2979-3010). Linear tasks with weights W (d features x T tasks); row
w^j holds feature j's weights in every task. The convex l1,2 / l1,inf penalties select a
feature for all tasks or for none and shrink large weights as much as small ones. The
paper's non-convex capped-l1,l1 penalty caps each feature's cost:

    min_W  sum_t 1/(2n) ||y_t - X_t w_t||^2 + lambda sum_j min(||w^j||_1, theta)

A feature whose summed absolute weight over the tasks exceeds theta costs the same
lambda theta however large it grows (no shrinkage of strong shared features), while weak
features keep an l1 cost on each entry, so tasks may still differ in what they use.

MSMTFL minimises it by majorisation: stage l solves the convex weighted problem

    W(l) = argmin_W  loss(W) + sum_j lambda_j(l-1) ||w^j||_1
    lambda_j(l) = lambda * [ ||w^j(l)||_1 < theta ]      (lambda_j(0) = lambda)

so stage 1 is the plain lasso on every entry and later stages stop penalising the
features that an earlier stage found strong. Each stage can only lower the capped
objective (tested). The stages here are solved by proximal gradient (ISTA) with per-row
soft-thresholding (:func:`.dirty_model.soft_threshold`). The paper's equation numbers are
not cited: its text was not available to check them.

:class:`MSMTFL` is the same linear model as a module for the training harness, with
:meth:`MSMTFL.auxiliary_loss` = lambda times the capped penalty; tasks with several
outputs contribute one column of W per output. The training harness takes (sub)gradient steps
on that objective; it does not run the stages, whose proximal lasso steps set weak features
exactly to zero (``training_procedure`` says so). It is linear in the input, as in the
paper, so it is built for vector inputs only (ValueError for images).

Left out: losses other than the square loss in the solver, the paper's error bounds and
its choice of lambda and theta, and its experiments. MALSAR's version (jiayuzhou/MALSAR, with
the first author among its authors) uses lambdas 2n times ours and stops on tolerances, where
``solve`` runs a fixed number of stages (rescaled, the weights agreed to about 1e-15).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .dirty_model import soft_threshold, squared_loss


def capped_l1_l1(w: Tensor, theta: float) -> Tensor:
    """sum over features j of min(||w^j||_1, theta); rows of ``w`` are features."""
    return w.abs().sum(dim=1).clamp_max(theta).sum()


def stage_weights(w: Tensor, lam: float, theta: float) -> Tensor:
    """lambda_j = lambda for features with ||w^j||_1 < theta, else 0 (the reweighting rule)."""
    return lam * (w.abs().sum(dim=1) < theta).to(w.dtype)


def _gradient(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor) -> Tensor:
    return torch.stack([x.T @ (x @ w[:, t] - y) / len(y) for t, (x, y) in enumerate(zip(xs, ys))], dim=1)


def weighted_lasso(xs: Sequence[Tensor], ys: Sequence[Tensor], row_weights: Tensor,
                   start: Tensor | None = None, iterations: int = 500) -> Tensor:
    """argmin_W loss(W) + sum_j row_weights[j] ||w^j||_1, by ISTA (the tasks decouple)."""
    w = xs[0].new_zeros(xs[0].shape[1], len(xs)) if start is None else start.clone()
    step = 1.0 / max(torch.linalg.matrix_norm(x, 2).item() ** 2 / len(x) for x in xs)
    for _ in range(iterations):
        w = soft_threshold(w - step * _gradient(xs, ys, w), step * row_weights[:, None])
    return w


def solve(xs: Sequence[Tensor], ys: Sequence[Tensor], lam: float, theta: float, stages: int = 5,
          iterations: int = 500) -> tuple[Tensor, list[Tensor]]:
    """MSMTFL: W after the last stage, and W after every stage (the first is the lasso)."""
    weights = xs[0].new_full((xs[0].shape[1],), lam)
    w, history = None, []
    for _ in range(stages):
        w = weighted_lasso(xs, ys, weights, w, iterations)
        history.append(w)
        weights = stage_weights(w, lam, theta)
    return w, history


def capped_objective(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor, lam: float, theta: float) -> Tensor:
    return squared_loss(xs, ys, w) + lam * capped_l1_l1(w, theta)


class MSMTFL(MultiTaskModel):
    """Linear tasks; the capped-l1,l1 penalty on the stacked weights as the auxiliary loss."""

    name = "msmtfl"
    training_procedure = ("the capped objective is minimised in stages, each a lasso reweighted by "
                          "msmtfl.stage_weights() and solved by proximal gradient (msmtfl.weighted_lasso(), "
                          "msmtfl.solve())")

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 lam: float = 1e-3, theta: float = 1.0):
        super().__init__(tasks)
        self.weights = nn.ParameterDict({t: nn.Parameter(torch.zeros(in_dim, out_dims[t])) for t in self.tasks})
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        self.lam, self.theta = lam, theta

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "MSMTFL":
        if problem.is_image:
            raise ValueError("MSMTFL is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def weight_matrix(self) -> Tensor:
        """W (d x total outputs): the task weights side by side."""
        return torch.cat([self.weights[t] for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """lambda sum_j min(||w^j||_1, theta) (from the parameters; no forward needed)."""
        return self.lam * capped_l1_l1(self.weight_matrix(), self.theta)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ self.weights[t] + self.biases[t] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.weights[task]  # the rows of W are coupled only through the penalty
        yield self.biases[task]
