"""ETAP: predicting each task's multi-task gain in a group from a gradient affinity score.

Ayman, Mukhopadhyay, Laszka, "Ensemble Prediction of Task Affinity for Efficient Multi-Task
Learning", ICLR 2026, arXiv:2602.18591. Equations are named, not numbered: the paper's
numbering could not be checked here. The rules follow the authors' code
(github.com/aronlaszka/ETAP: ``chemical_scripts/affinity_score_calculation.py``,
``train_step_ETAP_Affinity``, for the score; ``ETAP/Baseline_Prediction.py``, ``get_ITA``,
``affine_transformation`` and ``evaluate_BSpline_Ridge``, for the first prediction;
``ETAP/Residual_Prediction.py`` and ``ETAP/Final_prediction.py`` for the correction).

Which tasks should share a network? Training every candidate group is out of reach, so
ETAP predicts the gain of each task in a group (its multi-task performance over its
single-task one) from a few groups that were trained:

1. affinity score. While one multi-task model trains on all K tasks, a step on task i alone
   would change task j's loss, to first order in the learning rate η, by −η ⟨g_i, g_j⟩
   (g: gradients of the shared parameters). ETAP scores

       A[i, j] = ⟨g_i, g_j⟩ / L_j ,

   the relative decrease of L_j per unit of η: TAG's lookahead transference
   1 − L_j(θ − η g_i) / L_j(θ) linearised, which needs no extra forward pass. It is
   accumulated over training (the released scripts average each epoch's batches and sum
   the epochs): call :func:`model_affinity_scores` per batch and add up.
2. group score of task j in group G: the mean of A[i, j] over the other members i ∈ G.
3. first prediction, fitted on the trained groups' (group, task) pairs: the least-squares
   line from score to gain, then a non-linear map of that line's output, a B-spline basis
   with ridge regression;
4. residual correction: a ridge regression from the group's 0/1 membership vector to the
   K residuals (observed gain minus the first prediction) of its members.
   The final prediction is the first one plus the predicted residual, on members only.

Scores follow the released prediction script's "B->A" comment (how partners help a task). Its
preparation script writes the affinity table transposed (checked with pandas in the audit) and
the prediction script reads it by position, so a pipeline run from those files would score
the other direction; the files themselves are not in the repository, and the two readings
differ only in which task's loss normalises the score. With hyper-parameters fixed, the
prediction pipeline matched the released one to about 1e-16.

Left out: the grid searches with cross-validation that the released scripts run for the
spline degree, the number of knots and both ridge penalties (fixed arguments here, with
scikit-learn's defaults: 5 knots, degree 3, penalties 1), the momentum term that some of the
released runs add to the step, the alternative non-linear stages (k-nearest neighbours,
random forests, XGBoost residuals), the training of the groups that supply the gains, and the
group selection that uses the predictions (``ETAP/group_selection.py``). The spline follows
scikit-learn's ``SplineTransformer`` (uniform knots over the training range, constant
extrapolation beyond it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reference_impls.affinity.transference import (
    LossFn,
    detached_parameters,
    shared_gradients,
    shared_names,
)
from reference_impls.checks import require_above, require_at_least, require_positive


def affinity_scores(grads: Tensor, losses: Tensor) -> Tensor:
    """A[i, j] = ⟨g_i, g_j⟩ / L_j from the K x d shared gradients and the K losses."""
    return (grads @ grads.T) / losses[None, :]


def model_affinity_scores(model: nn.Module, loss_fn: LossFn, shared: Sequence[str] | None = None) -> Tensor:
    """The K x K affinity score of one batch (row: the task stepped on, column: the task measured)."""
    params = detached_parameters(model)
    shared = shared_names(model, shared)
    losses = loss_fn(params)
    return affinity_scores(shared_gradients(losses, params, shared), losses.detach())


def group_scores(affinity: Tensor, masks: Tensor) -> Tensor:
    """n x K: mean of A[i, j] over the other members i of each group, for members j (0 elsewhere)."""
    members = masks.to(affinity.dtype)
    others = members.sum(1, keepdim=True) - 1
    total = members @ affinity - members * affinity.diagonal()  # Σ_{i ∈ G, i ≠ j} A[i, j]
    return torch.where((members > 0) & (others > 0), total / others.clamp_min(1), torch.zeros_like(total))


def bspline_basis(x: Tensor, low: float, high: float, n_knots: int, degree: int) -> Tensor:
    """B-spline basis (len(x) x (n_knots + degree − 1)) on uniform knots over [low, high].

    Knots are extended by ``degree`` equal steps on each side; inputs outside [low, high] are
    clamped, so the spline is constant beyond the training range.
    """
    step = (high - low) / (n_knots - 1) if high > low else 1.0
    knots = low + step * torch.arange(-degree, n_knots + degree, dtype=x.dtype, device=x.device)
    x = x.clamp(low, high)
    span = ((x - low) / step).floor().long().clamp(0, n_knots - 2) + degree  # index of the knot interval
    basis = nn.functional.one_hot(span, len(knots) - 1).to(x.dtype)  # degree 0
    for p in range(1, degree + 1):  # Cox–de Boor recursion
        left = (x[:, None] - knots[None, :-p - 1]) / (p * step) * basis[:, :-1]
        right = (knots[None, p + 1:] - x[:, None]) / (p * step) * basis[:, 1:]
        basis = left + right
    return basis


def ridge(features: Tensor, targets: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unpenalised intercept: (coefficients, intercept)."""
    mean_x, mean_y = features.mean(0), targets.mean(0)
    xc, yc = features - mean_x, targets - mean_y
    gram = xc.T @ xc + l2 * torch.eye(features.shape[1], dtype=features.dtype, device=features.device)
    coef = torch.linalg.solve(gram, xc.T @ yc)
    return coef, mean_y - mean_x @ coef


class ETAP:
    """Ensemble gain predictor: affinity line, B-spline + ridge, then a membership ridge on residuals."""

    name = "etap"

    def __init__(self, n_knots: int = 5, degree: int = 3, spline_l2: float = 1.0,
                 residual_l2: float = 1.0, residual: bool = True) -> None:
        require_at_least(2, n_knots=n_knots)
        require_positive(degree=degree)
        require_above(0, spline_l2=spline_l2, residual_l2=residual_l2)
        self.n_knots, self.degree = n_knots, degree
        self.spline_l2, self.residual_l2, self.residual = spline_l2, residual_l2, residual
        self.affinity: Tensor | None = None

    def fit(self, affinity: Tensor, masks: Tensor, gains: Tensor) -> "ETAP":
        """Fit on trained groups: ``masks`` n x K membership, ``gains`` n x K (members' entries)."""
        self.affinity = affinity
        members = masks.to(torch.bool)
        x, y = group_scores(affinity, masks)[members], gains[members].to(affinity.dtype)
        # least-squares line: slope corr · σ_y / σ_x, through the means
        xc, yc = x - x.mean(), y - y.mean()
        self.slope = (xc @ yc) / (xc @ xc).clamp_min(torch.finfo(x.dtype).tiny)
        self.offset = y.mean() - self.slope * x.mean()
        line = self.slope * x + self.offset
        self.low, self.high = line.min().item(), line.max().item()
        self.spline_coef, self.spline_bias = ridge(self._basis(line), y, self.spline_l2)
        if self.residual:
            residuals = (gains.to(affinity.dtype) - self.first_prediction(masks)) * members
            self.res_coef, self.res_bias = ridge(members.to(affinity.dtype), residuals, self.residual_l2)
        return self

    def _basis(self, values: Tensor) -> Tensor:
        return bspline_basis(values, self.low, self.high, self.n_knots, self.degree)

    def first_prediction(self, masks: Tensor) -> Tensor:
        """n x K gains from the affinity score alone (line, then spline), 0 off members."""
        if self.affinity is None:
            raise RuntimeError("fit the predictor first")
        line = self.slope * group_scores(self.affinity, masks) + self.offset
        pred = self._basis(line.reshape(-1)) @ self.spline_coef + self.spline_bias
        return pred.view_as(line) * masks.to(line.dtype)

    def predict(self, masks: Tensor) -> Tensor:
        """n x K predicted gains: first prediction plus the membership model's residual."""
        pred = self.first_prediction(masks)
        if self.residual:
            pred = pred + (masks.to(pred.dtype) @ self.res_coef + self.res_bias) * masks.to(pred.dtype)
        return pred
