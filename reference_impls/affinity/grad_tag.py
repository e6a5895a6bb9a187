"""Grad-TAG: task affinities from one base model, by linearising it instead of retraining.

Li, Sharma, Zhang, "Scalable Multitask Learning Using Gradient-based Estimation of Task
Affinity", KDD 2024, arXiv:2409.06091. Equations are named, not numbered: the paper's
numbering could not be checked here. The rules follow the authors' code
(github.com/VirtuosoResearch/ScalableMTL, ``exps_on_graph_datasets/``:
``fast_estimate_collect_gradients.py``, ``fast_estimate_linear_model.py``,
``fast_estimate_eval_outputs.py``, ``run_clustering.py``) and the paper's abstract.

Measuring how well a subset S of tasks trains together normally means training a model on
S, for every subset one wants to score. Grad-TAG trains one base model θ* on all tasks and
stands in for the model trained on S by a first-order expansion around it,

    f_θ(x) ≈ f_θ*(x) + ∇_θ f_θ*(x) · (θ − θ*),

where f is the model's output logit for the example's task. The per-example gradients are
computed once and shrunk to m dimensions by a random sign matrix P (d x m, entries ±1/√m),
g_i = Pᵀ ∇_θ f_θ*(x_i). Fitting "the model trained on S" is then a logistic regression on
those m features over the examples of the tasks in S,

    w_S = argmin_w  ½ ‖w‖² + C Σ_{i ∈ S} log(1 + exp(−s_i (f_θ*(x_i) + g_i · w))),   s_i = ±1,

and the estimated parameters are θ_S = θ* + P w_S. Each task's loss is measured with the
model at θ_S, and the task affinity is the negated loss averaged over the subsets holding
both tasks (:func:`higher_order_affinity` with ``standardise=False``): on subsets of two tasks
that is the pairwise affinity −loss_i({i, j}), on larger random subsets the higher-order one.

The groups come from a semidefinite relaxation of "k clusters of the highest average
density" (``run_clustering.py``): with D = max(T) − T,

    minimise tr(D X)  over symmetric X ⪰ 0,  X ≥ 0,  X 1 = 1,  tr X = k,

whose integral points are X = Σ_c 1_c 1_cᵀ / |c| for a partition into k clusters, so that
n·max(T) − tr(D X) = Σ_c (1/|c|) Σ_{i,j ∈ c} T[i, j], the summed average densities. The
solution is rounded as the released script does: tasks i, j share a cluster where X[i, j] > 1/n,
assigned greedily in task order. The script can exponentiate T / temperature first
(``use_exp``); its own call does not.

The released script collects the gradients with the model in training mode (dropout on), here
in whatever mode the caller's model is in; ``offset=False`` fits no intercept, where the script
fits a free one and then drops it; the step from losses to affinities is not in the released
code at all and follows the paper.

Left out: training the base model (the caller's) and the image and instruction-tuning
variants; the released script fits the logistic regression on the first 80% of the subset's
concatenated examples only (the rest scores the fit), here on all of them. In the rounding, a
task already assigned is skipped and every other task opens a cluster holding at least itself;
the script instead opens a new cluster from an assigned task's unassigned neighbours and can
leave a task with no X[i, j] > 1/n unassigned (the two agree on the matrix X of a partition
into k >= 2 clusters; for k = 1, X = 11ᵀ/n and neither threshold is meaningful).

Our choices: the base output f_θ*(x_i) enters the logistic regression as a fixed offset, the first-order expansion the authors' ``fast_estimate_eval_outputs.py`` checks; the
released graph script instead fits the projected gradients alone with a free intercept that it
then discards. C defaults to 1 (scikit-learn's default; the released
``fast_estimate_linear_model.py`` uses ``LogisticRegression(C=1e-2)`` on its own objective,
with a free intercept and no offset, so its C does not carry over one to one). Binary
labels only. The authors solve the semidefinite program with CVXPY; here a plain ADMM
(alternating projections onto the constraints' affine part, the PSD cone and X ≥ 0) does it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from reference_impls.affinity.higher_order_affinity import higher_order_affinity
from reference_impls.affinity.same_draws import SameDraws
from reference_impls.checks import require_above, require_positive

OutputFn = Callable[[Tensor, Tensor, str], Tensor]  # (flat θ, inputs, task) -> one logit per input


def module_output_fn(model: nn.Module, seed: int | None = None) -> tuple[OutputFn, Tensor]:
    """``model``'s logits as a function of its flattened parameters, and those parameters now.

    The model maps a batch to ``{task: logits}`` with one logit per example. Every call
    draws the same random numbers (:class:`SameDraws`, seeded by ``seed``), so that a model
    that samples in training mode is linearised around one draw, and the estimate is
    evaluated with that draw too.
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    same_draws = SameDraws(model, seed)

    def outputs(flat: Tensor, x: Tensor, task: str) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        with same_draws():
            return functional_call(model, {**buffers, **params}, (x,))[task].reshape(len(x))

    return outputs, theta


def sign_projection(dim: int, project_dim: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """P (dim x project_dim) with independent entries ±1/√m: inner products kept in expectation."""
    require_positive(dim=dim, project_dim=project_dim)
    signs = torch.randint(0, 2, (dim, project_dim), generator=generator).to(dtype=dtype, device=device)
    return (2 * signs - 1) / project_dim ** 0.5


def fit_logistic(features: Tensor, labels: Tensor, offset: Tensor, inverse_l2: float,
                 iterations: int = 100, tol: float = 1e-10) -> Tensor:
    """argmin_w ½‖w‖² + C Σ_i log(1 + exp(−s_i (o_i + a_i · w))) by damped Newton steps."""
    signs = 2 * labels.to(features.dtype) - 1
    w = features.new_zeros(features.shape[1])

    def objective(v: Tensor) -> Tensor:
        return 0.5 * v @ v + inverse_l2 * F.softplus(-signs * (offset + features @ v)).sum()

    for _ in range(iterations):
        margin = signs * (offset + features @ w)
        pull = torch.sigmoid(-margin)  # how wrong each example still is
        grad = w - inverse_l2 * features.T @ (signs * pull)
        curvature = inverse_l2 * pull * (1 - pull)
        hessian = torch.eye(len(w), dtype=w.dtype, device=w.device) + features.T @ (curvature[:, None] * features)
        step = torch.linalg.solve(hessian, grad)
        size, before = 1.0, objective(w)
        while objective(w - size * step) > before and size > 1e-8:
            size /= 2  # backtrack: Newton's full step can overshoot far from the optimum
        w = w - size * step
        if (size * step).norm() <= tol * (1 + w.norm()):
            break
    return w


class GradTAG:
    """Estimated fine-tuned parameters and task losses for any subset, from one base model."""

    name = "grad_tag"

    def __init__(self, output_fn: OutputFn, theta: Tensor, inputs: Mapping[str, Tensor],
                 labels: Mapping[str, Tensor], project_dim: int, inverse_l2: float = 1.0,
                 generator: torch.Generator | None = None, offset: bool = True) -> None:
        require_above(0, inverse_l2=inverse_l2)
        self.output_fn, self.theta, self.inverse_l2 = output_fn, theta.detach(), inverse_l2
        self.tasks = list(inputs)
        self.labels = dict(labels)
        self.projection = sign_projection(theta.numel(), project_dim, generator, theta.dtype, theta.device)
        self.features, self.base = {}, {}
        for task in self.tasks:
            jacobian = jacrev(lambda flat: output_fn(flat, inputs[task], task))(self.theta)  # n x d
            self.features[task] = jacobian @ self.projection  # n x m projected gradients
            base = output_fn(self.theta, inputs[task], task).detach()
            self.base[task] = base if offset else torch.zeros_like(base)

    def coefficients(self, subset: Sequence[str]) -> Tensor:
        """w_S: the logistic regression on the projected gradients of the tasks in ``subset``."""
        unknown = [t for t in subset if t not in self.features]
        if unknown or not subset:
            raise ValueError(f"subset must be a non-empty list of known tasks, got {list(subset)}")
        return fit_logistic(torch.cat([self.features[t] for t in subset]),
                            torch.cat([self.labels[t] for t in subset]),
                            torch.cat([self.base[t] for t in subset]), self.inverse_l2)

    def estimate_parameters(self, subset: Sequence[str]) -> Tensor:
        """θ_S = θ* + P w_S: the stand-in for a model trained on ``subset``."""
        return self.theta + self.projection @ self.coefficients(subset)

    def task_losses(self, subset: Sequence[str], inputs: Mapping[str, Tensor],
                    labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Binary cross-entropy of each task in ``subset`` under θ_S, on the data given."""
        theta = self.estimate_parameters(subset)
        with torch.no_grad():
            return {t: F.binary_cross_entropy_with_logits(self.output_fn(theta, inputs[t], t),
                                                          labels[t].to(theta.dtype)) for t in subset}

    def affinity(self, subsets: Sequence[Sequence[str]], inputs: Mapping[str, Tensor],
                 labels: Mapping[str, Tensor]) -> Tensor:
        """K x K: −loss of task i averaged over the subsets holding i and j (0 on the diagonal)."""
        index = {t: k for k, t in enumerate(self.tasks)}
        masks = torch.zeros(len(subsets), len(self.tasks), dtype=torch.bool, device=self.theta.device)
        losses = torch.zeros(len(subsets), len(self.tasks), dtype=self.theta.dtype, device=self.theta.device)
        for row, subset in enumerate(subsets):
            for task, loss in self.task_losses(subset, inputs, labels).items():
                masks[row, index[task]] = True
                losses[row, index[task]] = loss
        return higher_order_affinity(masks, losses, standardise=False)


# ----------------------------------------------------------------------------------------------
# Task groups: the semidefinite relaxation of the highest average density clustering
# ----------------------------------------------------------------------------------------------


def _affine_projection(n: int, k: int, dtype: torch.dtype, device: torch.device | None):
    """Projection of a symmetric matrix onto {X : X 1 = 1, tr X = k} (Euclidean, among symmetric X)."""
    ones = torch.ones(n, dtype=dtype, device=device)

    def constraint(x: Tensor) -> Tensor:  # A(X) = (X 1, tr X)
        return torch.cat([x @ ones, x.trace()[None]])

    def adjoint(z: Tensor) -> Tensor:  # A*(y, t) = (y 1ᵀ + 1 yᵀ) / 2 + t I, symmetric
        y, t = z[:n], z[n]
        return (y[:, None] + y[None, :]) / 2 + t * torch.eye(n, dtype=dtype, device=device)

    basis = torch.eye(n + 1, dtype=dtype, device=device)
    gram = torch.stack([constraint(adjoint(e)) for e in basis], dim=1)  # A A*, (n + 1) x (n + 1)
    target = torch.cat([ones, torch.tensor([float(k)], dtype=dtype, device=device)])

    def project(x: Tensor) -> Tensor:
        return x - adjoint(torch.linalg.solve(gram, constraint(x) - target))

    return project


def sdp_relaxation(cost: Tensor, k: int, rho: float = 1.0, iterations: int = 5000,
                   tol: float = 1e-7) -> Tensor:
    """argmin tr(cost X) over X ⪰ 0, X ≥ 0, X 1 = 1, tr X = k, by consensus ADMM."""
    n = cost.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= number of tasks, got k={k} for {n} tasks")
    require_above(0, rho=rho)
    project = _affine_projection(n, k, cost.dtype, cost.device)
    cost = (cost + cost.T) / 2
    psd = nonneg = torch.full_like(cost, 1 / n)  # start from the uniform matrix (feasible for k = 1)
    dual_psd, dual_nonneg = torch.zeros_like(cost), torch.zeros_like(cost)
    for _ in range(iterations):
        x = project((psd - dual_psd + nonneg - dual_nonneg) / 2 - cost / (2 * rho))
        values, vectors = torch.linalg.eigh(x + dual_psd)
        new_psd = (vectors * values.clamp_min(0)) @ vectors.T
        new_nonneg = (x + dual_nonneg).clamp_min(0)
        dual_psd, dual_nonneg = dual_psd + x - new_psd, dual_nonneg + x - new_nonneg
        change = (new_psd - psd).abs().max() + (new_nonneg - nonneg).abs().max()
        psd, nonneg = new_psd, new_nonneg
        if change < tol and (x - psd).abs().max() < tol and (x - nonneg).abs().max() < tol:
            break
    return project((psd + nonneg) / 2)


def round_clusters(relaxed: Tensor) -> Tensor:
    """A label per task: in task order, an unassigned task takes every unassigned j with X[i, j] > 1/n."""
    n = relaxed.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long)
    close = (relaxed > 1 / n).cpu()
    cluster = 0
    for i in range(n):
        if labels[i] >= 0:
            continue
        members = close[i] & (labels < 0)
        members[i] = True
        labels[members] = cluster
        cluster += 1
    return labels.to(relaxed.device)


def sdp_clustering(affinity: Tensor, k: int, use_exp: bool = False, temperature: float = 1.0,
                   **solver) -> tuple[Tensor, Tensor]:
    """Grad-TAG's task groups: (a label per task, the relaxed X) for the K x K ``affinity``."""
    if use_exp:
        require_above(0, temperature=temperature)
        affinity = (affinity / temperature).exp()
    relaxed = sdp_relaxation(affinity.max() - affinity, k, **solver)
    return round_clusters(relaxed), relaxed
