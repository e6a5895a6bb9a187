"""Task metrics and Δm, the average relative change of a multi-task model over single-task ones.

Δm (Maninis, Radosavovic, Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019;
Vandenhende et al., "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI 2021):

    Δm = (1/T) Σ_t (-1)^{l_t} (M_mt,t − M_st,t) / M_st,t × 100

l_t = 1 when lower is better for metric t, so a positive Δm always means "the multi-task
model is better on average". :func:`delta_m` averages over the entries it is given; when a
task reports several metrics, pass each as its own entry (one common convention) or average
them per task first (the other); the docs of a result table must say which.

The metric classes accumulate over batches (mIoU needs a confusion matrix over the whole
set, not a mean of per-batch values) and say whether lower is better.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def delta_m(
    multi_task: Mapping[str, float],
    single_task: Mapping[str, float],
    lower_is_better: Mapping[str, bool],
) -> float:
    """Δm in percent over the keys of ``single_task`` (all three mappings share keys)."""
    keys = list(single_task)
    if not keys:
        raise ValueError("Δm needs at least one metric")
    missing = [k for k in keys if k not in multi_task or k not in lower_is_better]
    if missing:
        raise KeyError(f"metrics without a multi-task value or direction: {missing}")
    total = 0.0
    for k in keys:
        baseline = float(single_task[k])
        if baseline == 0:
            raise ZeroDivisionError(f"single-task value of {k!r} is 0; Δm is undefined")
        sign = -1.0 if lower_is_better[k] else 1.0  # (-1)^{l_t}
        total += sign * (float(multi_task[k]) - baseline) / baseline
    return 100.0 * total / len(keys)


class Metric:
    """Accumulate with :meth:`update` over batches, read with :meth:`compute`."""

    name: str = "metric"
    lower_is_better: bool = True
    unit_score: bool = False  # a score in [0, 1], higher is better: usable as a KPI (DTP)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError


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

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        predicted = prediction.detach().argmax(1).reshape(-1).cpu()
        target = target.reshape(-1).long().cpu()
        valid = target != self.ignore_index
        index = target[valid] * self.num_classes + predicted[valid]
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)

    def compute(self) -> float:
        c = self.confusion.double()
        intersection = c.diagonal()
        union = c.sum(0) + c.sum(1) - intersection
        present = union > 0
        return (intersection[present] / union[present]).mean().item() if present.any() else 0.0


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
    logit for one binary output (targets in {0, 1})."""

    name, lower_is_better, unit_score = "accuracy", False, True

    def __init__(self) -> None:
        self.correct, self.count = 0, 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        prediction = prediction.detach()
        if prediction.ndim > 1 and prediction.shape[1] > 1:
            predicted = prediction.argmax(1)
        else:
            predicted = (prediction.reshape(target.shape) > 0).long()
        self.correct += int((predicted == target.long()).sum().item())
        self.count += target.numel()

    def compute(self) -> float:
        return self.correct / max(self.count, 1)
