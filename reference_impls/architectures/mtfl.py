"""Multi-task feature learning: linear tasks on a few learned features they all share.

Argyriou, Evgeniou, Pontil, "Multi-Task Feature Learning", NeurIPS 2006 (no arXiv
version). Task t predicts <a_t, U^T x> with an orthogonal d x d matrix U of feature
directions shared by all tasks and its own coefficients a_t. Stacking the a_t as the
columns of A (d x T), the problem is

    min_{U orthogonal, A}  sum_t sum_i L(y_ti, <a_t, U^T x_ti>) + gamma ||A||_{2,1}^2

where ||A||_{2,1} sums the Euclidean norms of the *rows* of A: a feature is either used
by several tasks or by none, so few features end up shared. With W = U A this is
equivalent to the convex problem

    min_{W, D}  sum_t sum_i L(y_ti, <w_t, x_ti>) + gamma sum_t <w_t, D^+ w_t>
    s.t. D positive semi-definite, trace(D) <= 1, range(W) within range(D)

whose minimiser over D for fixed W is D = (W W^T)^{1/2} / trace((W W^T)^{1/2}), giving
the penalty gamma ||W||_*^2 (squared trace norm): the tasks' weight vectors are pushed
into a common low-dimensional subspace, the span of the learned features. The paper
solves it by alternating the two steps:

    W-step: for D fixed, each task alone: a ridge-type problem with metric D^+
    D-step: D = (W W^T + eps I)^{1/2} / trace(...)

For the square loss the W-step is closed form, w_t = D (X_t^T X_t D + gamma I)^{-1}
X_t^T y_t, which needs no inverse of D. ``eps`` (0 allowed) keeps D invertible, as in
the authors' follow-up (Argyriou, Evgeniou, Pontil, "Convex Multi-Task Feature
Learning", Machine Learning 2008); the learned features are the eigenvectors of D. The
paper's equation numbers are not cited: its text was not available to check them.

:class:`MTFL` is the non-convex form as a module for the training harness: an
orthogonal U (``torch.nn.utils.parametrizations.orthogonal``), per-task coefficients
and biases, and :meth:`MTFL.auxiliary_loss` = ``gamma`` ||A||_{2,1}^2. Tasks with several
outputs contribute one column of A per output. The model is linear in the input
features, as in the paper, so it is built for vector inputs only (ValueError for images).

Left out: losses other than the square loss in the alternating solver (the module takes
any loss), the paper's kernel/nonlinear extension and its experiments, and the authors'
MATLAB solver's sweep over eps (rerun with eps divided by 10 each time, the run with the
lowest objective kept, in train_alternating_epsilon.m; a modified copy of its solver, adding a
shared w0 term, is in YaLeeUSTC/MTMF): ``solve`` uses one fixed eps. The per-task biases of
the module are ours (not in the paper or the authors' code).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from .base import MultiTaskModel


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh(matrix)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def d_step(w: Tensor, eps: float = 0.0) -> Tensor:
    """D = (W W^T + eps I)^{1/2} / trace(...), for W of shape d x T.

    At W = 0 with eps = 0 the root is 0 and the ratio 0/0; D = I / d there, its value for every
    eps > 0 and so its limit as eps -> 0+ (along W itself D has no limit at 0)."""
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    root = sqrtm_psd(w @ w.T + eps * eye)
    trace = torch.trace(root)
    return root / trace if trace > 0 else eye / w.shape[0]


def w_step(xs: Sequence[Tensor], ys: Sequence[Tensor], d: Tensor, gamma: float) -> Tensor:
    """Per task, argmin_w ||y - X w||^2 + gamma w^T D^{-1} w = D (X^T X D + gamma I)^{-1} X^T y."""
    eye = torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    cols = [d @ torch.linalg.solve(x.T @ x @ d + gamma * eye, x.T @ y) for x, y in zip(xs, ys)]
    return torch.stack(cols, dim=1)


def solve(xs: Sequence[Tensor], ys: Sequence[Tensor], gamma: float, iterations: int = 100,
          eps: float = 1e-8) -> tuple[Tensor, Tensor, list[float]]:
    """Alternating minimisation from D = I / d; returns W (d x T), D and the objective per iteration."""
    dim = xs[0].shape[1]
    d = torch.eye(dim, dtype=xs[0].dtype, device=xs[0].device) / dim
    history = []
    for _ in range(iterations):
        w = w_step(xs, ys, d, gamma)
        d = d_step(w, eps)
        history.append(convex_objective(xs, ys, w, d, gamma).item())
    return w, d, history


def squared_error(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor) -> Tensor:
    return sum(((y - x @ w[:, t]) ** 2).sum() for t, (x, y) in enumerate(zip(xs, ys)))


def convex_objective(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor, d: Tensor, gamma: float) -> Tensor:
    """sum of squared errors + gamma sum_t <w_t, D^+ w_t>."""
    return squared_error(xs, ys, w) + gamma * torch.trace(w.T @ torch.linalg.pinv(d, hermitian=True) @ w)


def l21_norm(a: Tensor) -> Tensor:
    """Sum over rows of their Euclidean norms."""
    return a.norm(dim=1).sum()


def feature_objective(xs: Sequence[Tensor], ys: Sequence[Tensor], u: Tensor, a: Tensor, gamma: float) -> Tensor:
    """The original problem: sum of squared errors of W = U A + gamma ||A||_{2,1}^2."""
    return squared_error(xs, ys, u @ a) + gamma * l21_norm(a) ** 2


class MTFL(MultiTaskModel):
    """Shared orthogonal features U^T x, task coefficients A, (2,1)-norm penalty on A."""

    name = "mtfl"

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int], gamma: float = 1e-3):
        super().__init__(tasks)
        self.features = orthogonal(nn.Linear(in_dim, in_dim, bias=False))  # weight = U^T
        self.coefficients = nn.ParameterDict({
            t: nn.Parameter(torch.randn(in_dim, out_dims[t]) / in_dim**0.5) for t in self.tasks})
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        self.gamma = gamma

    @classmethod
    def from_problem(cls, problem, width: int = 32, gamma: float = 1e-3) -> "MTFL":
        if problem.is_image:
            raise ValueError("MTFL is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, gamma)  # width: unused

    def feature_matrix(self) -> Tensor:
        """U (d x d, orthogonal): column i is the i-th learned feature direction."""
        return self.features.weight.T

    def coefficient_matrix(self) -> Tensor:
        """A (d x total outputs): the task coefficients side by side."""
        return torch.cat([self.coefficients[t] for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """gamma ||A||_{2,1}^2 (from the parameters; no forward pass needed)."""
        return self.gamma * l21_norm(self.coefficient_matrix()) ** 2

    def encode(self, x: Tensor) -> Tensor:
        return self.features(x)  # U^T x

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: z @ self.coefficients[t] + self.biases[t] for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.coefficients[task]
        yield self.biases[task]
