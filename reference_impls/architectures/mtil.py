"""MTIL: linear tasks with pairwise feature interactions, related through the interaction tensor.

Lin, Xu, Baytas, Ji, Zhou, "Multi-Task Feature Interaction Learning", KDD 2016
(doi:10.1145/2939672.2939834; no arXiv version). Official MATLAB code:
github.com/KaixiangLin/MTIL-example (read for the model and the regularisers; nothing is
copied). The paper calls the framework MTIL; the catalogue id is ``mitl``.

Each task t is a linear model plus all pairwise (second-order) interactions of the d
features:

    f_t(x) = w_t^T x + x^T Q_t x,          w_t in R^d,  Q_t in R^{d x d}          (Eq. 1)

The T interaction matrices form a tensor Q in R^{d x d x T} (tasks on the third mode), the
weights a matrix W = [w_1 .. w_T] in R^{d x T}. Task relatedness is a structured penalty on
that tensor, added to the squared loss sum_t sum_j (f_t(x_tj) - y_tj)^2 / 2 (the sum over tasks
is Eq. 3, the per-example squared loss is in the paper's Table 1); the whole objective is
L(W, Q) + lambda_w R_F(W) + lambda_q R_I(Q) (Eq. 4):

* shared interaction approach (``approach="shared"``): tasks use the same *set* of
  interactions. Every interaction (j, k) is a group, the fibre Q[j, k, :] across tasks,
  penalised by a group lasso on the mode-3 unfolding,

      lambda_q * sum_{j,k} || Q[j, k, :] ||_2,

  which is ||Q||_GL, the paper's unnumbered stand-in (Sec. 4.2) for the symmetric group norm
  ||Q||_GL-Sym of Eq. (5) (the formulation with it is Eq. 6). The paper can use ||Q||_GL because
  it starts Q symmetric and its gradient and proximal steps keep it so; our Q starts
  non-symmetric, so the fibres (j, k) and (k, j) are penalised and thresholded apart, where
  Eq. (5) puts both in one group. The proximal step (group soft-thresholding,
  :func:`prox_group_lasso`) zeroes a fibre for all tasks at once, so the surviving
  interactions are common to every task (tested);
* embedded interaction approach (``approach="embedded"``, the paper's non-convex
  formulation): interactions of all tasks come from one shared r-dimensional subspace,

      Q_t = B q_t B^T,         B in R^{d x r} shared,  q_t in R^{r x r} per task

  (Sec. 4.3.2, not numbered; the paper leaves its penalty R_I(B, q) open, e.g. Frobenius),
  so every Q_t has rank <= r and its column space lies in span(B) (tested). The official
  code fits B, q_t and W by block coordinate descent; here they are ordinary parameters.

The weights carry their own penalty, as in the official code's variants: ``w_penalty=
"trace"`` is lambda_w ||W||_* (low-rank W, the "L" variants) and ``"l21"`` is lambda_w
sum_j ||W[j, :]||_2 (features selected jointly, the "S" variants). :meth:`MTIL.auxiliary_loss`
returns the whole penalty for the training harness (which then takes subgradient steps);
:meth:`MTIL.proximal_step` applies the exact proximal operators after a plain gradient step,
which is how the paper's solvers (proximal gradient / SpaRSA) treat the non-smooth terms;
:func:`fit_proximal` is a small full-batch proximal-gradient solver that uses it. Subgradient
steps minimise the same objective but never set a fibre or a row exactly to zero, so a run of
the harness does not select interactions or features (``training_procedure`` says so).

Several outputs per task (``out_dims[t] > 1``) get one (w, Q) per output; they are further
"tasks" of the third mode of the tensor and of the columns of W. The paper's tasks are
scalar regressions.

Choices where the paper or code leaves room: Q_t is not forced to be symmetric (the code
starts it symmetric and keeps it so; x^T Q x only sees the symmetric part anyway); there is
no intercept (the code has none: data are centred); parameters start at small random values
(std 0.01, B at 1/sqrt(d)); the code's drivers start from uniform random values (its warm
start is commented out). Its loss is a sum over examples, where ``fit_proximal`` takes each
task's mean; its non-convex solvers add ridge penalties on B and the q_t (weights 1) that
are left out here (KaixiangLin/MTIL-example).

Left out: the convex embedded formulation (Eq. 7, the trace norms of the three unfoldings of
Q, and its latent-trace-norm variant with three mode-wise low-rank parts), the block coordinate
descent solver, the paper's hyper-parameter search and its synthetic (Eq. 8) and real (school,
medical) data sets.

Equation numbers are those of the KDD 2016 camera-ready copy kept on the last author's site,
klinKDD16.pdf of jiayuzhou/jiayuzhou.github.io (under papers/, snapshot commit 2439a55).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel

APPROACHES = ("shared", "embedded")
W_PENALTIES = ("trace", "l21")


def quadratic_form(x: Tensor, q: Tensor) -> Tensor:
    """x^T Q_o x for every example and every output o: ``(n, d), (o, d, d) -> (n, o)``."""
    return torch.einsum("nj,ojk,nk->no", x, q, x)


def group_lasso(q: Tensor) -> Tensor:
    """sum over interactions (j, k) of the l2 norm of the fibre Q[j, k, :] across tasks."""
    return q.flatten(0, 1).norm(dim=1).sum()


def prox_group_lasso(v: Tensor, t: float) -> Tensor:
    """prox of t * (sum of the l2 norms of the groups along the last axis): each group scaled
    by max(0, 1 - t / ||group||), so it is shrunk, or dropped for every task at once. The
    groups are the fibres Q[j, k, :] of the interactions, or the rows W[j, :] of the features."""
    norms = v.norm(dim=-1, keepdim=True)
    return v * (1 - t / norms.clamp_min(torch.finfo(v.dtype).tiny)).clamp_min(0)


def prox_trace_norm(w: Tensor, t: float) -> Tensor:
    """prox of t * ||W||_*: singular value soft-thresholding."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u * (s - t).clamp_min(0)) @ vh


class MTIL(MultiTaskModel):
    """f_t(x) = w_t^T x + x^T Q_t x; Q shared in support ("shared") or in subspace ("embedded")."""

    name = "mtil"
    equations_checked_in = "klinKDD16.pdf of jiayuzhou/jiayuzhou.github.io"
    training_procedure = ("the non-smooth penalties are applied by proximal_step() after each gradient step "
                          "(mtil.fit_proximal()), which zeroes interactions and features exactly")

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 approach: str = "shared", rank: int = 2, w_penalty: str = "trace",
                 lambda_w: float = 1e-3, lambda_q: float = 1e-3):
        super().__init__(tasks)
        require_positive(in_dim=in_dim, rank=rank)
        require_non_negative(lambda_w=lambda_w, lambda_q=lambda_q)
        if approach not in APPROACHES:
            raise ValueError(f"approach must be one of {APPROACHES}, got {approach!r}")
        if w_penalty not in W_PENALTIES:
            raise ValueError(f"w_penalty must be one of {W_PENALTIES}, got {w_penalty!r}")
        self.approach, self.w_penalty = approach, w_penalty
        self.lambda_w, self.lambda_q = lambda_w, lambda_q
        self.out_dims = {t: out_dims[t] for t in self.tasks}
        d = in_dim
        self.weights = nn.ParameterDict({t: nn.Parameter(0.01 * torch.randn(d, o)) for t, o in self.out_dims.items()})
        if approach == "shared":
            # Q_t itself, one d x d matrix per output; related to the others only through the penalty
            self.interactions = nn.ParameterDict(
                {t: nn.Parameter(0.01 * torch.randn(o, d, d)) for t, o in self.out_dims.items()})
        else:
            self.basis = nn.Parameter(torch.randn(d, rank) / d**0.5)  # B, shared by every task
            self.cores = nn.ParameterDict(
                {t: nn.Parameter(0.01 * torch.randn(o, rank, rank)) for t, o in self.out_dims.items()})

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs) -> "MTIL":
        if problem.is_image:
            raise ValueError("MTIL is a linear model with pairwise feature interactions on vector features; "
                             "image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def interaction(self, task: str) -> Tensor:
        """Q_t as ``(outputs, d, d)``: the parameter itself, or B q_t B^T."""
        if self.approach == "shared":
            return self.interactions[task]
        return self.basis @ self.cores[task] @ self.basis.T

    def interaction_tensor(self) -> Tensor:
        """Q in R^{d x d x (sum of outputs)}: tasks (and their outputs) on the third mode."""
        return torch.cat([self.interaction(t) for t in self.tasks]).permute(1, 2, 0)

    def weight_matrix(self) -> Tensor:
        """W in R^{d x (sum of outputs)}."""
        return torch.cat([self.weights[t] for t in self.tasks], dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.approach == "shared":
            return {t: x @ self.weights[t] + quadratic_form(x, self.interactions[t]) for t in self.tasks}
        z = x @ self.basis  # x^T B Q x = (B^T x)^T q_t (B^T x): the d x d matrix is never formed
        return {t: x @ self.weights[t] + quadratic_form(z, self.cores[t]) for t in self.tasks}

    def w_regulariser(self) -> Tensor:
        w = self.weight_matrix()
        if self.w_penalty == "trace":
            return torch.linalg.matrix_norm(w, "nuc")
        return w.norm(dim=1).sum()

    def auxiliary_loss(self) -> Tensor:
        """lambda_w * (||W||_* or ||W||_{2,1}) + lambda_q * group lasso of Q (shared approach only;
        the embedded approach's structure here is its rank r alone: the official non-convex
        solvers also add ridge terms 0.5 (||B||² + Σ_t ||q_t||²) with weights 1, left out)."""
        penalty = self.lambda_w * self.w_regulariser()
        if self.approach == "shared":
            penalty = penalty + self.lambda_q * group_lasso(self.interaction_tensor())
        return penalty

    @torch.no_grad()
    def proximal_step(self, step: float) -> None:
        """Replace W and Q by their proximal points for ``step`` times the penalty (in place)."""
        sizes = list(self.out_dims.values())
        prox_w = prox_trace_norm if self.w_penalty == "trace" else prox_group_lasso
        new_w = prox_w(self.weight_matrix(), step * self.lambda_w)
        for t, block in zip(self.tasks, new_w.split(sizes, dim=1)):
            self.weights[t].copy_(block)
        if self.approach == "shared":
            new_q = prox_group_lasso(self.interaction_tensor(), step * self.lambda_q).permute(2, 0, 1)
            for t, block in zip(self.tasks, new_q.split(sizes)):
                self.interactions[t].copy_(block)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # w_t and Q_t (or q_t) are coupled to the other tasks' only through the penalty
        yield self.weights[task]
        yield (self.interactions if self.approach == "shared" else self.cores)[task]


def fit_proximal(model: MTIL, xs: Mapping[str, Tensor], ys: Mapping[str, Tensor],
                 step: float, iterations: int) -> list[float]:
    """Full-batch proximal gradient on sum_t mean_j (f_t(x_tj) - y_tj)^2 / 2 plus the penalty.

    ``xs[t]`` is ``(n_t, d)``, ``ys[t]`` is ``(n_t, outputs)``. Returns the smooth loss per
    iteration. Each task is fed its own examples, as in the paper (tasks need not share inputs).
    """
    require_positive(iterations=iterations)
    if not step > 0:
        raise ValueError(f"step must be above 0, got {step}")
    losses = []
    for _ in range(iterations):
        model.zero_grad(set_to_none=True)
        loss = sum(((model(xs[t])[t] - ys[t]) ** 2).sum(1).mean() / 2 for t in model.tasks)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(step * p.grad)
        model.proximal_step(step)
        losses.append(loss.item())
    return losses
