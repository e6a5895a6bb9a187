"""EPO search: descend onto the Pareto front at the point whose losses follow a preference ray.

Mahapatra & Rajan, "Multi-Task Learning with User Preferences: Gradient Descent with
Controlled Ascent in Pareto Optimization", ICML 2020, PMLR 119:6597-6607 (no arXiv id is
cited for it here; arXiv:2108.00597 is the authors' later, extended paper).

Given a preference r > 0, the exact Pareto-optimal (EPO) point is the Pareto-optimal one with
r_1 L_1 = r_2 L_2 = ... = r_K L_K: the loss vector lies on the ray through r⁻¹. How far L is
from that ray is measured by the non-uniformity of r ⊙ L, the KL divergence of its
normalisation from the uniform distribution:

    l̂ = r ⊙ L / Σ_j r_j L_j,      μ = Σ_j l̂_j log(K l̂_j)   (0 exactly on the ray).

Its gradient in L is proportional to the adjustments a_j = r_j (log(K l̂_j) − μ), so descending
along d_bal = Σ_j a_j g_j lowers μ. Each step picks weights β on the simplex, update
d = Σ_k β_k g_k (θ <- θ − lr d), by a small linear programme on the Gramian C = G Gᵀ, in
which (Cβ)_j = g_j · d is the first-order decrease of L_j:

* balance (μ > ε): maximise d · d_bal = βᵀ C a subject to (Cβ)_j >= 0 for the task(s) with
  the largest r_j L_j (the worst off relative to the preference may not rise) and
  (Cβ)_j >= (Ca)_j for the tasks with (Ca)_j <= 0 (they may rise, but no faster than along
  d_bal itself: the "controlled ascent"). When no (Ca)_j is positive every (Cβ)_j >= 0 is
  required instead.
* descent (μ <= ε, on the ray): maximise Σ_j (Cβ)_j subject to (Cβ)_j >= 0 for every j (no
  loss rises) and βᵀCa >= min(max_j (Ca)_j, 0) (the step does not push L off the ray when
  it can avoid it).

The LP is tiny (K unknowns, at most K + 1 constraints) and the project has no LP library
(SciPy is not installed and cvxpy, which the authors use with GLPK, is not a dependency), so
``maximize_on_simplex`` solves it with a dense two-phase simplex method using Bland's rule,
which cannot cycle. When the LP is infeasible we fall back to MGDA's min-norm weights, a
direction along which no loss rises (the authors' training scripts fall back to β = r / Σ r
instead: multiMNIST/epo_train.py, checked in dbmptr/EPOSearch).
The LP is posed on the Gramian scaled by its largest diagonal entry (β does not depend on
the scale). Equation numbers are not cited: no copy of the ICML paper's text was at hand to
check them; the LP above is the one in the authors' code (``epo_lp.py``).

Interface: the direction depends on the losses (they must be >= 0). Call
``method(grads, losses)``, or, with ``gradients.gradient_step``, ``method.observe(losses)``
first: the next call uses (and then forgets) those losses. ``last_mode`` records which LP ran.

Left out: the authors' step-size rule for their toy problems (step scaled by max(μ, 0.1)),
and two choices of their training scripts: β multiplied by K before weighting the losses (a
step-size factor), and β = r / Σ r when the LP solver returns nothing (our fallback above is
MGDA's weights instead).
Their "relaxed" descent LP, without the last constraint, is ``restrict=False``.

Defaults: ε = 1e-4 (μ at or below which the descent LP runs) and the restricted descent LP are
the authors' code's (``EPO_LP(m, n, r, eps=1e-4)`` and ``get_alpha(..., relax=False)`` in
github.com/dbmptr/EPOSearch, ``multiMNIST/epo_lp.py``; their training scripts keep both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix
from reference_impls.weighting.gradients import min_norm_weights, normalized_gramian

_TOL = 1e-10


def non_uniformity(losses: np.ndarray, preference: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(μ, adjustments a, r ⊙ L) for non-negative losses; μ = 0 and a = 0 if every r_j L_j is 0.

    In a, shares l̂_j below 1e-12 are raised to 1e-12 inside the log (a zero loss would give
    −∞); μ itself uses 0 log 0 = 0.
    """
    weighted = preference * losses
    total = weighted.sum()
    if not total > 0:
        return 0.0, np.zeros_like(losses), weighted
    share = weighted / total  # l̂
    k = len(losses)
    mu = float(np.sum(share[share > 0] * np.log(k * share[share > 0])))
    log_ratio = np.log(k * np.maximum(share, 1e-12))  # a zero loss: large but finite adjustment
    return mu, preference * (log_ratio - mu), weighted


def maximize_on_simplex(objective: np.ndarray, rows: np.ndarray, lower: np.ndarray) -> np.ndarray | None:
    """argmax objective · β over β >= 0, Σβ = 1, rows β >= lower; None if infeasible.

    Standard form: x = (β, s) >= 0 with Σβ = 1 and rows β − s = lower, solved by
    ``_standard_simplex``. Rows with a negative right-hand side are negated first so the
    artificial variables of phase 1 start feasible.
    """
    k, m = len(objective), len(lower)
    matrix = np.zeros((m + 1, k + m))
    matrix[0, :k] = 1.0
    matrix[1:, :k] = rows
    matrix[1:, k:] = -np.eye(m)
    rhs = np.concatenate([[1.0], lower])
    flip = rhs < 0
    matrix[flip] *= -1
    rhs[flip] *= -1
    solution = _standard_simplex(matrix, rhs, np.concatenate([objective, np.zeros(m)]))
    return None if solution is None else solution[:k]


def _standard_simplex(matrix: np.ndarray, rhs: np.ndarray, cost: np.ndarray) -> np.ndarray | None:
    """max costᵀx s.t. matrix x = rhs >= 0, x >= 0 (bounded): two-phase tableau simplex."""
    p, n = matrix.shape
    tableau = np.zeros((p + 1, n + p + 1))
    tableau[:p, :n], tableau[:p, n : n + p], tableau[:p, -1] = matrix, np.eye(p), rhs
    basis = list(range(n, n + p))
    # Phase 1: minimise the sum of the artificial variables (reduced costs in the last row).
    tableau[p, :n] = -matrix.sum(axis=0)
    tableau[p, -1] = -rhs.sum()
    if not _pivot_until_optimal(tableau, basis, n + p) or tableau[p, -1] < -_TOL * max(1.0, rhs.sum()):
        return None
    _drive_out_artificials(tableau, basis, n)
    # Phase 2: minimise −costᵀx over the original columns only.
    tableau[p, :] = 0.0
    tableau[p, :n] = -cost
    for row, column in enumerate(basis):
        tableau[p] -= tableau[p, column] * tableau[row]
    tableau[:, n : n + p] = 0.0  # artificial columns may not re-enter
    if not _pivot_until_optimal(tableau, basis, n):
        return None
    x = np.zeros(n + p)
    x[basis] = tableau[:p, -1]
    return np.clip(x[:n], 0.0, None)


def _pivot_until_optimal(tableau: np.ndarray, basis: list[int], columns: int) -> bool:
    """Bland's rule: enter the first column with a negative reduced cost, leave by the ratio test."""
    p = len(basis)
    for _ in range(50 * (tableau.shape[1] + p)):
        entering = np.flatnonzero(tableau[p, :columns] < -_TOL)
        if len(entering) == 0:
            return True
        column = int(entering[0])
        positive = tableau[:p, column] > _TOL
        if not positive.any():
            return False  # unbounded: cannot happen on the simplex, reported as failure
        ratios = np.where(positive, tableau[:p, -1] / np.where(positive, tableau[:p, column], 1.0), np.inf)
        best = ratios.min()
        ties = np.flatnonzero(ratios <= best + _TOL * max(1.0, abs(best)))
        row = int(min(ties, key=lambda r: basis[r]))  # Bland: smallest basic index among ties
        _pivot(tableau, basis, row, column)
    return False


def _drive_out_artificials(tableau: np.ndarray, basis: list[int], n: int) -> None:
    """Swap artificial variables left in the basis at level 0 for original columns where possible."""
    for row, column in enumerate(basis):
        if column >= n:
            candidates = np.flatnonzero(np.abs(tableau[row, :n]) > _TOL)
            if len(candidates):
                _pivot(tableau, basis, row, int(candidates[0]))


def _pivot(tableau: np.ndarray, basis: list[int], row: int, column: int) -> None:
    tableau[row] /= tableau[row, column]
    for other in range(len(tableau)):
        if other != row and tableau[other, column] != 0.0:
            tableau[other] -= tableau[other, column] * tableau[row]
    basis[row] = column


class EPO(GradientMethod):
    """Balance toward the preference ray, then descend along it (one LP per step)."""

    name = "epo"
    training_hook = "observe"  # the current losses, before each call

    def __init__(self, preference: Tensor | Sequence[float], epsilon: float = 1e-4, restrict: bool = True) -> None:
        preference = torch.as_tensor(preference, dtype=torch.float64).reshape(-1)
        if not (preference > 0).all():
            raise ValueError("preference must be positive")
        self.preference = preference
        self.epsilon = epsilon  # μ below which the point counts as on the ray
        self.restrict = restrict
        self.pending_losses: Tensor | None = None
        self.last_mode: str | None = None  # "balance", "descent" or "fallback"

    def observe(self, losses: Tensor) -> None:
        """Record the current losses for the next call (the ``gradient_step`` route)."""
        self.pending_losses = losses.detach().reshape(-1)

    def __call__(self, grads: Tensor, losses: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        losses = self._take_losses(losses, len(grads))
        weights = self.weights_from_gramian(grads @ grads.T, losses).to(grads.dtype)
        return Aggregation(update=weights @ grads, weights=weights)

    def _take_losses(self, losses: Tensor | None, num_tasks: int) -> Tensor:
        if losses is None:
            losses, self.pending_losses = self.pending_losses, None
        if losses is None:
            raise ValueError("EPO needs the losses: call method(grads, losses) or observe(losses) first")
        losses = losses.detach().reshape(-1)
        if len(losses) != num_tasks or len(self.preference) != num_tasks:
            raise ValueError(f"{num_tasks} gradients, {len(losses)} losses, {len(self.preference)} preferences")
        if (losses < 0).any():
            raise ValueError("EPO needs non-negative losses")
        return losses

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """β on the simplex from the K x K Gramian and the current losses."""
        matrix, scale = normalized_gramian(gramian)
        if scale == 0.0:  # every gradient is zero: any β gives the zero update
            self.last_mode = "descent"
            return torch.full((len(matrix),), 1.0 / len(matrix), dtype=matrix.dtype, device=matrix.device)
        gram = matrix.cpu().double().numpy()
        mu, adjustments, weighted = non_uniformity(losses.cpu().double().numpy(), self.preference.numpy())
        slack = 10 * len(gram) * torch.finfo(gramian.dtype).eps  # the Gramian's own rounding
        beta = self._solve_lp(gram, gram @ adjustments, weighted, mu, slack)
        if beta is None:
            self.last_mode = "fallback"
            return min_norm_weights(matrix)
        return torch.from_numpy(beta / beta.sum()).to(matrix.device, matrix.dtype)

    def _solve_lp(
        self, gram: np.ndarray, pull: np.ndarray, weighted: np.ndarray, mu: float, slack: float
    ) -> np.ndarray | None:
        """The balance or descent LP; ``pull`` is C a (inner products of each g_j with d_bal).

        Every lower bound is relaxed by ``slack``: a Gramian rounded in float32 must not turn a
        constraint that holds exactly (e.g. 0 >= 0 at the zero combination of opposite
        gradients) into an infeasible one.
        """
        k = len(gram)
        if mu > self.epsilon:
            self.last_mode = "balance"
            ahead = weighted >= weighted.max()  # J*: the largest r_j L_j
            rising = pull > 0  # J: tasks that d_bal already decreases
            lower = np.where(rising, -np.inf, pull) if rising.any() else np.zeros(k)
            lower = np.where(ahead, 0.0, lower)
            keep = np.isfinite(lower)
            return maximize_on_simplex(pull, gram[keep], lower[keep] - slack)
        self.last_mode = "descent"
        rows, lower = gram, np.zeros(k)
        if self.restrict:
            rows = np.vstack([gram, pull[None]])  # βᵀ C a >= min(max_j (Ca)_j, 0)
            lower = np.append(lower, min(pull.max(), 0.0))
        return maximize_on_simplex(gram.sum(axis=0), rows, lower - slack)
