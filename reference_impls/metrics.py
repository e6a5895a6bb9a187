"""Task metrics and Δm, the average relative change of a multi-task model over single-task ones.

Δm (Maninis, Radosavovic, Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019;
Vandenhende et al., "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021):

    Δm = (1/T) Σ_t (1/N_t) Σ_j (-1)^{l_j} (M_mt,j − M_st,j) / M_st,j × 100

over the T tasks and the N_t metrics j of task t. l_j = 1 when lower is better for metric j,
so a positive Δm always means "the multi-task model is better on average" (the sign of
Maninis et al., of Vandenhende et al.'s code and of LibMTL; Nash-MTL and others report the
negative, where lower is better). With ``tasks`` (metric -> task) :func:`delta_m` averages
each task's metrics first, as above; without it every metric counts as its own task, which
is the same when each task has one metric (the training harness) and is the other common
convention (a plain mean over all metrics) otherwise. The docs of a result table must say which.

Equation numbers, as the authors' own code cites them (the papers' texts could not be read
here): Eq. 4 in Section 5 of Maninis et al.'s arXiv version (1904.08918), per the README of
lorenmt/mtan; Eq. 10 of the survey, per the README of SimonVandenhende/Multi-Task-Learning-PyTorch.
Both READMEs describe the measure in words, so the formula above is checked against their
descriptions and code, not against the equations themselves.

The metric classes accumulate over batches (mIoU needs a confusion matrix over the whole
set, not a mean of per-batch values) and say whether lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

IGNORE_INDEX = -1  # the class label of unlabelled pixels in the harness's segmentation data


def delta_m(
    multi_task: Mapping[str, float],
    single_task: Mapping[str, float],
    lower_is_better: Mapping[str, bool],
    tasks: Mapping[str, str] | None = None,
) -> float:
    """Δm in percent over the keys of ``single_task``; ``tasks`` maps each key to its task.

    Δm is undefined, and refused with a message, for a metric with no multi-task value,
    direction or task, and for a single-task value that is 0 (division by zero), negative
    (the relative change would take the wrong sign) or not finite. A non-finite multi-task
    value (a diverged run) is passed through, so the result is inf or NaN, not an error.
    """
    keys = list(single_task)
    if not keys:
        raise ValueError("Δm needs at least one metric")
    missing = [k for k in keys if k not in multi_task or k not in lower_is_better
               or (tasks is not None and k not in tasks)]
    if missing:
        raise KeyError(f"metrics without a multi-task value, direction or task: {missing}")
    per_task: dict[str, list[float]] = {}
    for k in keys:
        baseline = float(single_task[k])
        if baseline == 0:
            raise ZeroDivisionError(f"single-task value of {k!r} is 0; Δm is undefined")
        if not 0 < baseline < math.inf:
            raise ValueError(f"single-task value of {k!r} is {baseline}; Δm needs a positive finite baseline")
        sign = -1.0 if lower_is_better[k] else 1.0  # (-1)^{l_j}
        per_task.setdefault(k if tasks is None else tasks[k], []).append(
            sign * (float(multi_task[k]) - baseline) / baseline)
    return 100.0 * sum(sum(changes) / len(changes) for changes in per_task.values()) / len(per_task)


def require_class_ids(target: Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Class ids outside 0 .. num_classes - 1 (other than the ignored one) are a labelling or
    a configuration error; counted as misses, or indexed past the confusion matrix, they would
    silently lower the score or fail with an unrelated shape error."""
    bad = target[(target < 0) | (target >= num_classes)]
    if bad.numel():
        shown = bad.unique()[:5].tolist()  # unique() sorts
        ignored = "" if ignore_index is None else f" (or {ignore_index}, ignored)"
        raise ValueError(f"class ids must be 0 .. {num_classes - 1}{ignored}, got {shown}")


class Metric:
    """Accumulate with :meth:`update` over batches, read with :meth:`compute`."""

    name: str = "metric"
    lower_is_better: bool = True
    unit_score: bool = False  # a score in [0, 1], higher is better: usable as a KPI (DTP)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    @property
    def seen(self) -> int:
        """How many entries were scored: 0 means ``compute`` has nothing to report (every
        target ignored, or no data), and its 0 is not a score."""
        return self.count


class MeanSquaredError(Metric):
    name, lower_is_better = "mse", True

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        diff = prediction.detach().reshape(target.shape).float() - target.float()
        self.total += diff.pow(2).sum().item()
        self.count += diff.numel()

    def compute(self) -> float:
        return self.total / max(self.count, 1)


class MeanAbsoluteError(Metric):
    """Mean |prediction − target| over valid entries; with ``ignore_zero`` (depth maps as in the
    MTAN/LibMTL layout) entries whose target is 0 are missing measurements and are skipped."""

    name, lower_is_better = "abs_err", True

    def __init__(self, ignore_zero: bool = False) -> None:
        self.ignore_zero = ignore_zero
        self.total, self.count = 0.0, 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        diff = (prediction.detach().reshape(target.shape).float() - target.float()).abs()
        if self.ignore_zero:
            diff = diff[target != 0]
        self.total += diff.sum().item()
        self.count += diff.numel()

    def compute(self) -> float:
        return self.total / max(self.count, 1)


class MeanIoU(Metric):
    """Mean intersection-over-union from a confusion matrix; pixels labelled ``ignore_index``
    are skipped and classes that never occur (in target or prediction) are left out of the mean."""

    name, lower_is_better, unit_score = "miou", False, True

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        if prediction.shape[1] != self.num_classes:  # argmax over more channels would land in the next row
            raise ValueError(f"prediction has {prediction.shape[1]} class channels, the metric {self.num_classes}")
        predicted = prediction.detach().argmax(1).reshape(-1).cpu()
        target = target.reshape(-1).long().cpu()
        valid = target != self.ignore_index
        labels = target[valid]
        require_class_ids(labels, self.num_classes, self.ignore_index)
        index = labels * self.num_classes + predicted[valid]
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)

    def compute(self) -> float:
        c = self.confusion.double()
        intersection = c.diagonal()
        union = c.sum(0) + c.sum(1) - intersection
        present = union > 0
        return (intersection[present] / union[present]).mean().item() if present.any() else 0.0

    @property
    def seen(self) -> int:
        return int(self.confusion.sum())


class MeanAngularError(Metric):
    """Mean angle in degrees between predicted and target normals (B, 3, H, W); pixels whose
    target normal is all zeros carry no label and are skipped."""

    name, lower_is_better = "mean_angle", True

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        p = torch.nn.functional.normalize(prediction.detach().float(), dim=1)
        t = target.float()
        valid = t.abs().sum(1) > 0
        cosine = (p * torch.nn.functional.normalize(t, dim=1)).sum(1).clamp(-1, 1)
        self.total += torch.rad2deg(torch.acos(cosine[valid])).sum().item()
        self.count += int(valid.sum().item())

    def compute(self) -> float:
        return self.total / max(self.count, 1)


class Accuracy(Metric):
    """Share of correct predictions: argmax over dim 1 for several classes, sign of the
    logit for one binary output (targets in {0, 1}). Targets equal to ``ignore_index`` (an
    Office image of another domain's task) are not counted."""

    name, lower_is_better, unit_score = "accuracy", False, True

    def __init__(self, ignore_index: int | None = None) -> None:
        self.correct, self.count = 0, 0
        self.ignore_index = ignore_index

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction = prediction.detach()
        if prediction.ndim > 1 and prediction.shape[1] > 1:
            predicted, classes = prediction.argmax(1), prediction.shape[1]
        else:
            predicted, classes = (prediction.reshape(target.shape) > 0).long(), 2
        counted = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        require_class_ids(target[counted].long(), classes, self.ignore_index)
        self.correct += int(((predicted == target.long()) & counted).sum().item())
        self.count += int(counted.sum().item())

    def compute(self) -> float:
        return self.correct / max(self.count, 1)
