"""Plumbing shared by the gradient methods: per-task gradients, writing updates, DDP, small solvers.

Reading order:

1. ``per_task_gradients``: K losses -> the K x d matrix of gradients of the shared parameters.
2. ``gradient_step``: apply a ``GradientMethod`` to that matrix and write the update into ``.grad``
   (shared parameters get the aggregated update, task-specific ones the gradient of sum_k L_k).
3. ``representation_step``: the MGDA-UB style variant, where the method sees the gradients of the
   K losses w.r.t. a shared representation z and one backward pass carries the result through
   the encoder.
4. ``all_reduce_mean``: under ``torch.distributed`` each rank holds the K x d matrix of its own
   shard; averaging it *before* aggregation makes every rank aggregate the full-batch matrix.
5. Small exact solvers on K x K matrices used by several methods (MGDA, UPGrad, CAGrad,
   Nash-MTL, FairGrad, MoCo). They run in float64 on the input's device whatever the input
   dtype, because K is small and the answers must satisfy optimality conditions tightly.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, GramianWeighting, check_gradient_matrix


# ----------------------------------------------------------------------------------------------
# 1. Per-task gradients
# ----------------------------------------------------------------------------------------------


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate gradients into one vector; a missing gradient (unused parameter) is zero."""
    return torch.cat(
        [(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)]
    )


def per_task_gradients(
    losses: Sequence[Tensor] | Tensor, params: Sequence[Tensor], batched: bool = False
) -> Tensor:
    """Return the K x d matrix whose row k is dL_k/dθ for the (flattened) parameters θ.

    ``batched=False`` runs K backward passes (``retain_graph=True`` so the graph survives).
    ``batched=True`` runs one vectorised pass (``is_grads_batched``, built on ``torch.vmap``);
    it is faster but not every operator supports it.
    """
    params = list(params)
    losses = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
    if batched:
        basis = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, params, grad_outputs=basis, is_grads_batched=True,
            retain_graph=True, allow_unused=True,
        )
        rows = [
            (g if g is not None else torch.zeros(len(losses), *p.shape, dtype=p.dtype, device=p.device))
            .reshape(len(losses), -1)
            for g, p in zip(grads, params)
        ]
        return torch.cat(rows, dim=1)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(flatten(grads, params))
    return torch.stack(rows)


def write_gradients(vector: Tensor, params: Sequence[Tensor]) -> None:
    """Unflatten ``vector`` into the parameters' shapes and *overwrite* their ``.grad``."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset : offset + n].reshape(p.shape).to(p.dtype).clone()
        offset += n
    if offset != vector.numel():
        raise ValueError(f"update has {vector.numel()} entries, parameters have {offset}")


# ----------------------------------------------------------------------------------------------
# 2. Parameter-level step
# ----------------------------------------------------------------------------------------------


def gradient_step(
    method: GradientMethod,
    losses: Sequence[Tensor] | Tensor,
    shared_params: Sequence[Tensor],
    task_params: Sequence[Tensor] = (),
    batched: bool = False,
) -> Aggregation:
    """Fill ``.grad`` for one step of a gradient method; call ``optimizer.step()`` afterwards.

    Shared parameters receive ``method(G).update`` where G is the K x d matrix of per-task
    gradients; task-specific parameters receive the gradient of ``sum_k L_k`` (a head only
    sees its own loss, so that is its own task gradient). Under ``torch.distributed`` both are
    averaged across ranks first (see ``all_reduce_mean``), so every rank writes the same update.
    Existing ``.grad`` values are overwritten, not accumulated.
    """
    losses = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
    shared_params, task_params = list(shared_params), list(task_params)
    if task_params:
        head_grads = torch.autograd.grad(losses.sum(), task_params, retain_graph=True, allow_unused=True)
        write_gradients(all_reduce_mean(flatten(head_grads, task_params)), task_params)
    matrix = all_reduce_mean(per_task_gradients(losses, shared_params, batched=batched))
    aggregation = method(matrix)
    write_gradients(aggregation.update, shared_params)
    return aggregation


# ----------------------------------------------------------------------------------------------
# 3. Representation-level step (MGDA-UB style)
# ----------------------------------------------------------------------------------------------


def representation_step(
    method: GradientMethod,
    losses: Sequence[Tensor] | Tensor,
    representation: Tensor,
    task_params: Sequence[Tensor] = (),
) -> Aggregation:
    """Aggregate dL_k/dz for a shared representation z, then one backward through the encoder.

    The K rows are the gradients of the losses w.r.t. z (batch x features, flattened). The
    method's update u (for a weighting method, u = sum_k w_k dL_k/dz) is sent back through the
    encoder with ``z.backward(u)``, which is exactly one backward pass of sum_k w_k L_k below z.
    Heads (``task_params``) get the gradient of sum_k L_k, as in the parameter-level step.
    Gradients are *accumulated* into ``.grad`` (ordinary ``backward`` semantics).

    Under ``torch.distributed`` with a ``GramianWeighting`` method, the K x K Gramian is summed
    over ranks and divided by world_size², which equals the Gramian of the full batch when each
    rank's loss is the mean over an equal-sized shard; every rank then uses the same weights.
    Encoder and head gradients stay local: average them across ranks afterwards (DDP's wrapper
    or ``average_parameter_gradients``). Other methods see only the local rows.
    """
    losses = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
    task_params = list(task_params)
    rows = per_task_gradients(losses, [representation])
    if isinstance(method, GramianWeighting) and _distributed():
        gramian = rows @ rows.T
        dist.all_reduce(gramian)
        weights = method.weights_from_gramian(gramian / dist.get_world_size() ** 2)
        aggregation = Aggregation(update=weights @ rows, weights=weights)
    else:
        aggregation = method(rows)
    if task_params:
        head_grads = torch.autograd.grad(losses.sum(), task_params, retain_graph=True, allow_unused=True)
        for p, g in zip(task_params, head_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    representation.backward(aggregation.update.reshape(representation.shape).to(representation.dtype))
    return aggregation


# ----------------------------------------------------------------------------------------------
# 4. Distributed data parallel
# ----------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks when torch.distributed is initialised; else return it.

    Applied to the K x d matrix before aggregation: if rank r's losses are means over a shard
    of B/R samples, the average of the R local matrices is the matrix of the full batch of B,
    so ``method(all_reduce_mean(G_local))`` is the single-process update on the full batch.
    Randomised methods must be seeded identically on every rank for their updates to agree.
    """
    if not _distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def average_parameter_gradients(params: Sequence[Tensor]) -> None:
    """Average ``.grad`` of ``params`` over ranks in place (no-op without torch.distributed)."""
    for p in params:
        if p.grad is not None:
            p.grad = all_reduce_mean(p.grad)


# ----------------------------------------------------------------------------------------------
# 5. Small exact solvers on K x K matrices
# ----------------------------------------------------------------------------------------------


def solver_dtype(device: torch.device) -> torch.dtype:
    """float64 for the K x K solves, except on backends without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def rounding_cutoff(dtype: torch.dtype, floor: float) -> float:
    """Relative eigenvalue cut-off below which a Gramian computed in ``dtype`` holds only
    rounding noise: 1000 eps (~1e-4 for float32), capped at 1e-2 because half precision's
    1000 eps is about 1, and never below ``floor`` (the float64 setting)."""
    return max(floor, min(1000 * torch.finfo(dtype).eps, 1e-2))


def rows_rounding_cutoff(dtype: torch.dtype, floor: float) -> float:
    """The cut-off for a Gramian formed in float64 from rows stored in ``dtype``: its only noise
    is the rows' own rounding, eps relative in a singular value and so eps² in an eigenvalue.
    (1000 eps)² is ~1e-8 for float32 rows (a gradient 0.5 degrees out of the others' span keeps
    its direction, where a float32 Gramian's own rounding forced ~1e-4), capped at 1e-2 for half
    precision and never below ``floor``."""
    return max(floor, min((1000 * torch.finfo(dtype).eps) ** 2, 1e-2))


def gramian_to_invert(grads: Tensor, floor: float, block: int = 1 << 20) -> tuple[Tensor, float]:
    """The Gramian of ``grads`` and the relative eigenvalue cut-off to invert it with.

    In the input's dtype, with ``rounding_cutoff``, while the rows' cosine matrix is well
    conditioned (the usual case, at no extra cost); when it is not, a low-precision Gramian's
    own rounding would force a cut-off that drops real directions (a float32 gradient 0.5
    degrees out of the others' plane), so the Gramian is formed again in float64 from the rows,
    ``block`` columns at a time so that no float64 copy of the whole matrix is made, with
    ``rows_rounding_cutoff``."""
    gram = grads @ grads.T
    cutoff = rounding_cutoff(grads.dtype, floor)
    wide = solver_dtype(grads.device)
    if grads.dtype == wide:
        return gram, cutoff
    norms = gram.diagonal().to(wide).clamp_min(0).sqrt()
    live = norms > 0
    cosine = gram.to(wide)[live][:, live] / torch.outer(norms[live], norms[live])
    values = torch.linalg.eigvalsh(cosine) if len(cosine) else norms.new_ones(1)
    if float(values.min()) > 100 * cutoff * float(values.max()):
        return gram, cutoff
    gram = sum(part @ part.T for part in (grads[:, i : i + block].to(wide) for i in range(0, grads.shape[1], block)))
    return gram, rows_rounding_cutoff(grads.dtype, floor)


class InvertingGramianWeighting(GramianWeighting):
    """A Gramian method that inverts small eigenvalues above a relative cut-off: its Gramian
    and cut-off come from ``gramian_to_invert`` (``cutoff_floor`` is the float64 setting), and
    ``weights_from_gramian`` takes the cut-off (``None``: that of a Gramian computed in its dtype)."""

    cutoff_floor: float = 1e-10

    @abstractmethod
    def weights_from_gramian(self, gramian: Tensor, cutoff: float | None = None) -> Tensor:
        """K weights from the K x K Gramian, inverting eigenvalues above ``cutoff``."""

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        gramian, cutoff = gramian_to_invert(grads, floor=self.cutoff_floor)
        weights = self.weights_from_gramian(gramian, cutoff).to(grads.dtype)
        return Aggregation(update=weights @ grads, weights=weights)


def normalized_gramian(gramian: Tensor) -> tuple[Tensor, float]:
    """Return (Gramian / s, s) with s its largest diagonal entry, in the solver dtype.

    Scale-free solvers work on the normalised matrix so inputs from 1e-10 to 1e10 behave alike.
    s = 0 means every row is zero.
    """
    gramian = gramian.to(solver_dtype(gramian.device))
    gramian = (gramian + gramian.T) / 2
    scale = float(gramian.diagonal().max()) if len(gramian) else 0.0
    if not scale > 0 or scale == float("inf"):
        return torch.zeros_like(gramian), 0.0
    return gramian / scale, scale


def _solve_symmetric(matrix: Tensor, rhs: Tensor) -> Tensor:
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) != 0 or not torch.isfinite(solution).all():
        solution = torch.linalg.pinv(matrix, hermitian=True) @ rhs
    return solution


def nonnegative_quadratic_minimum(quadratic: Tensor, linear: Tensor) -> Tensor:
    """Exactly solve ``min_{x >= 0} ½ xᵀQx − pᵀx`` for a PSD Q (Lawson–Hanson active set).

    With Q = AᵀA and p = Aᵀb this is non-negative least squares min ||Ax − b||, written on the
    Gramian so the cost depends on K only. Each round frees the coordinate whose gradient
    points most into the feasible side, solves the equality-constrained problem on the free
    set, and steps back to the boundary when a free coordinate would turn negative. It stops
    after finitely many rounds with the KKT conditions met up to rounding: x >= 0,
    p − Qx <= 0 on the bound coordinates, = 0 on the free ones.
    """
    k = len(linear)
    x = torch.zeros_like(linear)
    free = torch.zeros(k, dtype=torch.bool, device=linear.device)
    blocked = torch.zeros_like(free)  # entered with a zero step (rounding-level gradient): skip
    scale = max(float(quadratic.abs().max()), float(linear.abs().max()), 1e-300)
    tol = 10 * k * torch.finfo(linear.dtype).eps * scale
    for _ in range(10 * k + 20):
        descent = linear - quadratic @ x
        candidates = ~free & ~blocked & (descent > tol)
        if not candidates.any():
            break
        entering = int(torch.where(candidates, descent, -torch.inf).argmax())
        free[entering] = True
        for _ in range(k + 1):
            idx = free.nonzero().squeeze(1)
            z = torch.zeros_like(x)
            z[idx] = _solve_symmetric(quadratic[idx][:, idx], linear[idx])
            if (z[idx] > 0).all():
                x, blocked = z, torch.zeros_like(free)
                break
            # Move from x towards z until the first free coordinate hits zero, then drop it.
            ratios = torch.where(free & (z <= 0), x / (x - z).clamp_min(1e-300), torch.inf)
            leaving = int(ratios.argmin())
            if leaving == entering and float(ratios[leaving]) == 0.0:
                free[entering], blocked[entering] = False, True
                break
            x = x + ratios[leaving] * (z - x)
            x[leaving] = 0.0
            free &= x > 0
            x = torch.where(free, x, torch.zeros_like(x))
    return x


def nonnegative_quadratic_minima(quadratic: Tensor, linear: Tensor, free: Tensor | None = None) -> Tensor:
    """Solve ``min_{x >= 0} ½ xᵀQx − p_bᵀx`` for every row p_b of ``linear`` (B x K) at once.

    Same problems and answers as ``nonnegative_quadratic_minimum``, much faster: a primal-dual
    active-set iteration (Hintermüller, Ito & Kunisch, SIAM J. Optim. 13(3), 2002) runs on all
    B problems together. Guess the free set F (``free``; default p_b > 0, where the gradient
    at 0 points into the orthant), solve Q_FF x_F = p_F with one batched Cholesky, then bind
    the free coordinates that came out <= 0 and free the bound ones whose gradient points
    inwards. When a guess reproduces itself, x meets the KKT conditions; typical inputs need
    1-4 rounds instead of one Python-level round per free coordinate.

    An answer is kept only with a certificate: Cholesky succeeded with no pivot below 1e-9
    of the scale (Q_FF well conditioned, so the backward-stable solve leaves a rounding-level
    residual on F and the support is linearly independent, as Lawson–Hanson's is), x > 0 on
    F and the gradient Qx − p >= −tol off F. A problem without one (cycling guesses,
    rank-deficient Q) goes to the Lawson–Hanson solver, which always terminates, so
    degenerate inputs get exactly its answer.
    """
    batch, k = linear.shape
    scale = max(float(torch.maximum(quadratic.abs().max(), linear.abs().max())), 1e-300)
    tol = 10 * k * torch.finfo(linear.dtype).eps * scale
    # Off F the systems get scale·I (pivots = scale, x = 0 there), keeping the batch square.
    padding = scale * torch.eye(k, dtype=quadratic.dtype, device=quadratic.device)
    free = linear > tol if free is None else free.expand(batch, k)
    inward = linear - tol  # a bound coordinate is freed where (Qx)_j < p_j − tol
    for _ in range(k + 3):
        restricted = torch.where(free[:, :, None] & free[:, None, :], quadratic, padding)
        factor, info = torch.linalg.cholesky_ex(restricted)
        x = torch.cholesky_solve((linear * free).unsqueeze(-1), factor).squeeze(-1)
        guess = torch.where(free, x > 0, x @ quadratic < inward)  # Q is symmetric
        pivots = factor.diagonal(dim1=-2, dim2=-1).amin(1) ** 2
        certified = (guess == free).all(1) & (info == 0) & (pivots > 1e-9 * scale)
        if bool(certified.all()):
            return x  # exactly 0 off F: those rows of the block-diagonal factor are zero
        if torch.equal(guess, free):  # stuck on an uncertified guess: leave it to the fallback
            break
        free = guess
    x = x * (free & certified[:, None])
    for b in (~certified).nonzero().flatten().tolist():
        x[b] = nonnegative_quadratic_minimum(quadratic, linear[b])
    return x


def min_norm_weights(gramian: Tensor, support: Tensor | None = None) -> Tensor:
    """Weights α on the simplex minimising ||Σ α_k g_k||² = αᵀMα, solved exactly.

    Reduction to non-negative least squares: with A = [Gᵀ; 1ᵀ] and b = (0, 1), the minimiser
    β of ||Aβ − b||² over β >= 0 satisfies (Mβ)_k >= 1 − 1ᵀβ with equality where β_k > 0;
    dividing by t = 1ᵀβ > 0 gives α = β/t with (Mα)_k >= αᵀMα, equality on the support,
    which is the KKT system of the min-norm problem. All-zero rows give uniform weights.
    ``support`` (K booleans) is an optional guess of where α > 0, e.g. the support of a
    nearby problem's answer; it changes the speed, not the answer. K = 2 has a closed form
    (the minimiser of ||α g_1 + (1 − α) g_2||² on [0, 1]; α = ½ for identical rows).
    """
    matrix, scale = normalized_gramian(gramian)
    k = len(matrix)
    if scale == 0.0:
        return torch.full((k,), 1.0 / k, dtype=matrix.dtype, device=matrix.device)
    if k == 2:
        gap = matrix[0, 0] - 2 * matrix[0, 1] + matrix[1, 1]  # ||g_1 − g_2||²
        alpha = torch.where(gap > 0, (matrix[1, 1] - matrix[0, 1]) / gap, 0.5).clamp(0, 1)
        return torch.stack([alpha, 1 - alpha])
    ones = torch.ones(1, k, dtype=matrix.dtype, device=matrix.device)
    guess = None if support is None else support.reshape(1, k)
    beta = nonnegative_quadratic_minima(matrix + 1, ones, guess)[0]  # Q = M + 11ᵀ, p = 1
    return beta / beta.sum()


def project_onto_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of v onto {x >= 0, Σx = 1} (sort-and-threshold, exact)."""
    v = v - v.max()  # the projection ignores shifts along (1, ..., 1); this keeps it well scaled
    sorted_v, _ = torch.sort(v, descending=True)
    cumulative = sorted_v.cumsum(0) - 1
    index = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int((sorted_v - cumulative / index > 0).nonzero().max())
    threshold = cumulative[rho] / (rho + 1)
    return (v - threshold).clamp_min(0)


class PowerSolution(NamedTuple):
    """Solution of (Mw)_i = w_i^(−p): weights, max_i |w_i^p (Mw)_i − 1|, whether solved."""

    weights: Tensor
    residual: float
    exact: bool


def solve_power_system(gramian: Tensor, power: float, tol: float = 1e-12, max_iter: int = 100) -> PowerSolution:
    """Solve (Mw)_i = w_i^(−p), w > 0 (Nash-MTL: p = 1; FairGrad: p = 1/α) by Newton's method.

    The system is the stationarity condition of the strictly convex
    f(w) = ½ wᵀMw − Σ_i h(w_i) with h'(w) = w^(−p), so damped Newton with a backtracking
    line search on f converges to its unique minimiser when one exists. It exists iff no
    non-negative combination of the rows vanishes, i.e. 0 is outside their convex hull (the
    MGDA min-norm point is not 0). When 0 is inside (a zero row, two opposite rows, more
    tasks than dimensions...) no direction improves every task and the system has no
    solution: we return weights 0 (the zero update) with exact=False and residual inf, as
    we do if Newton fails to converge.

    Accuracy: the residual max_i |w_i^p (Mw)_i − 1| is driven below ``tol`` or, when that is
    out of float64's reach, to the rounding floor of evaluating it (``rounding_floor``):
    nearly opposite gradients need large w, and (Mw)_i is then a small difference of large
    terms. ``exact`` means one of the two was met; ``residual`` says which. The floor grows
    with w, so it alone could accept anything: for rows closer to opposite than float64
    can tell from exactly opposite (1 + cos near eps), residual and floor both reach 1, and
    a residual of 1 is what no solution looks like (below). So a residual is accepted only
    while residual + floor < ``CERTIFIED_BELOW``: then the true residual is below 1/2, which
    proves a solution exists; past that the answer is "no solution", as for opposite rows.

    Newton runs first (usually 3-5 steps): if λ >= 0, λ != 0 has Gᵀλ = 0 then
    Σ_k λ_k (Mw)_k = 0, so some (Mw)_k <= 0 and the residual is >= 1 for every w > 0, hence
    converging proves that a solution exists. Only when a few steps do not converge do we
    pay for the hull test (and then Newton's full budget). The K x K iteration runs on the
    host in float64 NumPy: it is sequential and tiny, so per-call overhead is all its cost.
    """
    matrix, scale = normalized_gramian(gramian)
    k = len(matrix)
    no_solution = PowerSolution(torch.zeros(k, dtype=matrix.dtype, device=matrix.device), float("inf"), False)
    if scale == 0.0:
        return no_solution
    host = matrix.to("cpu", torch.float64).numpy()  # float64 even where the device lacks it (MPS)
    solution = _newton_power(host, power, tol, max_iter=8)
    if solution is None:  # slow start or no solution: 0 in the hull means no solution
        hull_point = min_norm_weights(matrix)
        if float(hull_point @ matrix @ hull_point) <= 1e-14:
            return no_solution
        solution = _newton_power(host, power, tol, max_iter)
    if solution is None:
        return no_solution
    weights, residual = solution
    # M = s·M̂ and w = c·ŵ solve the system when s·c = c^(−p), i.e. c = s^(−1/(1+p)).
    weights = torch.from_numpy(weights * scale ** (-1.0 / (1.0 + power))).to(matrix.device, matrix.dtype)
    return PowerSolution(weights, residual, True)


#: A residual (with its rounding floor) at or above this is not accepted as a solution: 1
#: or more is what every w gives when no solution exists, and 1/2 leaves a margin.
CERTIFIED_BELOW = 0.5


def certified(residual: float, tol: float, floor: float) -> bool:
    """The stopping test of the power-system solvers: converged to ``tol`` or to the rounding
    floor, with the floor small enough that the residual still proves a solution exists."""
    return residual <= max(tol, floor) and residual + floor < CERTIFIED_BELOW


def rounding_floor(abs_matrix: np.ndarray, w: np.ndarray, power: float) -> float:
    """The residual float64 can promise at w: 4K·eps·max_i w_i^p (|M| w)_i (pass |M|).

    Each (Mw)_i sums K products of size up to (|M| w)_i, so evaluating it costs about K·eps
    times that. Near the solution Newton got to 0.01-0.11 of K·eps·max_i w_i^p (|M| w)_i on
    nearly opposite pairs (measured; ``test_nearly_opposite_gradients_are_solved`` checks the
    bound), so 4 leaves a margin. For well-spread gradients this is ~1e-14, below ``tol``."""
    return 4 * len(w) * np.finfo(np.float64).eps * float((w**power * (abs_matrix @ w)).max())


def _barrier(w: np.ndarray, power: float) -> np.ndarray:
    """h(w) with h'(w) = w^(−p): log w for p = 1, else w^(1−p) / (1−p)."""
    return np.log(w) if power == 1.0 else w ** (1.0 - power) / (1.0 - power)


def _power_objective(matrix: np.ndarray, w: np.ndarray, power: float) -> float:
    return float(0.5 * w @ matrix @ w - _barrier(w, power).sum())


def _objective_rounding(abs_matrix: np.ndarray, w: np.ndarray, power: float) -> float:
    """Rounding error of evaluating f at w: eps times the size of the terms it sums."""
    terms = 0.5 * w @ abs_matrix @ w + np.abs(_barrier(w, power)).sum()
    return len(w) * np.finfo(np.float64).eps * float(terms)


def _newton_power(matrix: np.ndarray, power: float, tol: float, max_iter: int) -> tuple[np.ndarray, float] | None:
    """Damped Newton on the normalised matrix; None if it does not converge.

    Start: u_k = M_kk^(−1/(1+p)) solves the system when the rows are orthogonal; we start at
    the minimiser of f on the ray c·u, c^(1+p) = Σ u_k^(1−p) / uᵀMu (also the exact answer
    for K = 2 when p = 1; a zero row gives inf and returns None: no solution). For p = 1,
    f (a convex quadratic minus Σ log w_k) is self-concordant, so once the Newton decrement
    λ = √(−slope) is <= 0.25 the backtracking search would accept the full step anyway
    (Boyd & Vandenberghe, Convex Optimization, §9.6.4): we skip evaluating it.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u = np.diagonal(matrix) ** (-1.0 / (1.0 + power))
        w = u * ((u ** (1.0 - power)).sum() / (u @ matrix @ u)) ** (1.0 / (1.0 + power))
    abs_matrix = np.abs(matrix)
    for iteration in range(max_iter + 1):
        if not (np.isfinite(w).all() and w.max() <= 1e12):
            return None
        mw = matrix @ w
        residual = float(np.abs(w**power * mw - 1).max())
        if certified(residual, tol, rounding_floor(abs_matrix, w, power)):
            return w, residual
        if iteration == max_iter:
            return None
        gradient = mw - w ** (-power)
        # M is PSD and the barrier adds a positive diagonal: the Hessian is positive definite.
        hessian = matrix + np.diag(power * w ** (-power - 1))
        try:
            step = -np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:  # singular to rounding: least-squares step
            step = -np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        slope = float(gradient @ step)
        shrinking = step < 0
        ratio = float((-w[shrinking] / step[shrinking]).min()) if shrinking.any() else math.inf
        t = min(1.0, 0.95 * ratio)
        full_step_accepted = power == 1.0 and -slope <= 0.25**2 and t == 1.0
        if not full_step_accepted:
            f0 = _power_objective(matrix, w, power)
            # Backtrack until f decreases enough (Armijo), unless the predicted decrease is
            # below f's own rounding: there f cannot judge a step, and Newton's full step
            # is what converges (quadratically, this close to the minimiser).
            if -slope > 16 * _objective_rounding(abs_matrix, w, power):
                while t > 1e-12 and _power_objective(matrix, w + t * step, power) > f0 + 1e-4 * t * slope:
                    t /= 2
                if t <= 1e-12:  # no decrease in float64 and the residual is not met
                    return None
        w = w + t * step
    return None
