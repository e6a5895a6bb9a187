"""GO-MTL: every task's weights are a sparse combination of a few shared latent basis tasks.

Kumar & Daumé III, "Learning Task Grouping and Overlap in Multi-task Learning", ICML 2012
(arXiv:1206.6417). The weight matrix W (d x T, one column per task) is factorised as

    W = L S,   L: d x k (k latent basis tasks, shared),   S: k x T (column s_t: task t's code)

and both factors are learned with an l1 penalty on the codes and a Frobenius penalty on
the basis:

    min_{L, S}  sum_t loss_t(L s_t) + mu ||S||_1 + lambda ||L||_F^2

Tasks whose codes use the same bases form a group (their weights lie in the span of those
bases); two groups overlap when their codes share a basis, so tasks in different groups
can still share part of what they learn, and a task whose code shares nothing with the
others is learned alone. The objective is non-convex jointly but convex in each factor,
and is minimised by alternating the two:

    S-step: for L fixed, one l1-regularised (lasso) problem per task, on the features L^T x
    L-step: for S fixed, a ridge problem in L (closed form for the square loss)

The factorisation and the objective follow the paper's abstract and later restatements
(e.g. the survey in JordanFrecon/jordanfrecon.github.io, _posts/2020-10-29-multi-task-
structure-learning.md), with the square loss summed over examples here. No code released
by the authors was found. The paper's equation numbers are not cited: its text was not
available to check them.

:class:`GOMTL` puts the factorisation on a network: a shared trunk (the paper's inputs
are its features), a shared basis L and, per task, a code S_t and a bias; task t's output
layer is the linear map with weights L S_t, so W = L S holds exactly (tested). A task
with several outputs has one code column per output. :meth:`GOMTL.auxiliary_loss` is
mu ||S||_1 + lambda ||L||_F^2; the harness takes (sub)gradient steps on it with the task
losses, which shrink codes but do not set them exactly to zero as the S-step's lasso does
(``training_procedure`` says so). :func:`solve` is the alternation for linear tasks with
the square loss, the S-step by proximal gradient (ISTA).

Left out: losses other than the square loss in :func:`solve`, the paper's own choices of
S-step solver and of starting point (not checked; ours are ISTA, and L from the top-k
left singular vectors of independently fitted ridge weights), the experiments.
``num_bases`` (4), ``mu`` and ``lam`` defaults are ours. :func:`solve` sums the loss over
examples, while the training harness averages it over the batch, so the same ``mu`` and ``lam``
weigh differently in the two.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .dirty_model import soft_threshold
from .encoders import trunk_for


def squared_error(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor) -> Tensor:
    return sum(((y - x @ w[:, t]) ** 2).sum() for t, (x, y) in enumerate(zip(xs, ys)))


def objective(xs: Sequence[Tensor], ys: Sequence[Tensor], basis: Tensor, codes: Tensor, mu: float,
              lam: float) -> Tensor:
    """sum of squared errors of W = L S + mu ||S||_1 + lambda ||L||_F^2."""
    return squared_error(xs, ys, basis @ codes) + mu * codes.abs().sum() + lam * basis.square().sum()


def lasso(a: Tensor, y: Tensor, mu: float, start: Tensor, iterations: int) -> Tensor:
    """argmin_s ||y - A s||^2 + mu ||s||_1 by ISTA (step 1 / Lipschitz constant of the smooth part)."""
    step = 1.0 / max(2 * torch.linalg.matrix_norm(a, 2).item() ** 2, 1e-12)
    s = start.clone()
    for _ in range(iterations):
        s = soft_threshold(s - step * 2 * a.T @ (a @ s - y), step * mu)
    return s


def s_step(xs: Sequence[Tensor], ys: Sequence[Tensor], basis: Tensor, mu: float, start: Tensor,
           iterations: int = 500) -> Tensor:
    """For L fixed: task t's code is a lasso on the latent features X_t L (the tasks decouple)."""
    return torch.stack([lasso(x @ basis, y, mu, start[:, t], iterations) for t, (x, y) in enumerate(zip(xs, ys))],
                       dim=1)


def l_step(xs: Sequence[Tensor], ys: Sequence[Tensor], codes: Tensor, lam: float) -> Tensor:
    """For S fixed: argmin_L sum_t ||y_t - X_t L s_t||^2 + lambda ||L||_F^2, in closed form.

    With vec stacking L's columns, X_t L s_t = (s_t^T kron X_t) vec(L): one ridge problem in vec(L)."""
    d, k = xs[0].shape[1], codes.shape[0]
    designs = [torch.kron(codes[:, t][None, :], x) for t, x in enumerate(xs)]  # n_t x (k d)
    gram = sum(a.T @ a for a in designs) + lam * torch.eye(k * d, dtype=codes.dtype, device=codes.device)
    vec = torch.linalg.solve(gram, sum(a.T @ y for a, y in zip(designs, ys)))
    return vec.reshape(k, d).T


def ridge_weights(xs: Sequence[Tensor], ys: Sequence[Tensor], lam: float) -> Tensor:
    """Each task alone: argmin_w ||y - X w||^2 + lambda ||w||^2 (d x T)."""
    eye = torch.eye(xs[0].shape[1], dtype=xs[0].dtype, device=xs[0].device)
    return torch.stack([torch.linalg.solve(x.T @ x + lam * eye, x.T @ y) for x, y in zip(xs, ys)], dim=1)


def solve(xs: Sequence[Tensor], ys: Sequence[Tensor], num_bases: int, mu: float, lam: float,
          iterations: int = 20, lasso_iterations: int = 500) -> tuple[Tensor, Tensor, list[float]]:
    """Alternate S- and L-steps; returns L, S and the objective after each L-step. Each S-step starts
    from the last codes, so its ISTA steps, like the exact L-step, never raise the objective."""
    basis = torch.linalg.svd(ridge_weights(xs, ys, lam), full_matrices=False)[0][:, :num_bases]
    codes = basis.new_zeros(num_bases, len(xs))
    history = []
    for _ in range(iterations):
        codes = s_step(xs, ys, basis, mu, codes, lasso_iterations)
        basis = l_step(xs, ys, codes, lam)
        history.append(objective(xs, ys, basis, codes, mu, lam).item())
    return basis, codes, history


class GOMTL(MultiTaskModel):
    """Shared ``trunk`` and basis L; per task a code S_t and a bias; task t's output layer is L S_t."""

    name = "go_mtl"
    training_procedure = ("the factors are learned by alternating a lasso on each task's code (go_mtl.s_step()) "
                          "and a closed-form ridge step on the shared basis (go_mtl.l_step()), as go_mtl.solve() does")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, feature_dim: int, out_dims: Mapping[str, int],
                 num_bases: int = 4, mu: float = 1e-3, lam: float = 1e-3):
        super().__init__(tasks)
        require_positive(num_bases=num_bases)
        self.trunk = trunk
        self.basis = nn.Parameter(torch.randn(feature_dim, num_bases) / feature_dim**0.5)
        self.codes = nn.ParameterDict({t: nn.Parameter(torch.randn(num_bases, out_dims[t]) / num_bases**0.5)
                                       for t in self.tasks})
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        self.mu, self.lam = mu, lam

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kwargs: float) -> "GOMTL":
        trunk = trunk_for(problem.input_shape, width, depth)
        if problem.is_image and not problem.dense:  # image-level tasks read pooled features
            trunk = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return cls(problem.tasks, trunk, width, problem.task_out_dims, **kwargs)

    def code_matrix(self) -> Tensor:
        """S (bases x total outputs): the task codes side by side."""
        return torch.cat([self.codes[t] for t in self.tasks], dim=1)

    def weight_matrix(self) -> Tensor:
        """W = L S (features x total outputs)."""
        return self.basis @ self.code_matrix()

    def auxiliary_loss(self) -> Tensor:
        """mu ||S||_1 + lambda ||L||_F^2 (from the parameters; no forward needed)."""
        return self.mu * self.code_matrix().abs().sum() + self.lam * self.basis.square().sum()

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for t in self.tasks:
            w = self.basis @ self.codes[t]  # features x outputs of task t
            y = torch.einsum("do,bd...->bo...", w, z)
            outputs[t] = y + self.biases[t].view(1, -1, *([1] * (z.ndim - 2)))
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.codes[task]  # the basis L is shared by every task
        yield self.biases[task]
