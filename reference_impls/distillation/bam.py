"""BAM! Born-again multi-task networks: single-task teachers, annealed towards the gold labels.

Clark, Luong, Khandelwal, Manning, Le, "BAM! Born-Again Multi-Task Networks for Natural
Language Understanding", ACL 2019, arXiv:1907.04829. Equations are named, not numbered:
the paper's numbering could not be checked here.

One single-task model per task is trained first (same architecture as the student, hence
"born again"). The multi-task student is then trained on every task's data against a
mixture of the gold label y and the teacher's prediction f_T(x):

    target(x) = λ · y  +  (1 − λ) · f_T(x)          (teacher annealing)
    loss      = ℓ(target(x), f(x; θ))

with λ rising linearly from 0 at the first step to 1 at the last (λ = step / total steps).
Early on the student imitates its teachers, whose soft predictions are easier to fit from
a shared network; by the end it trains on the gold labels alone, so it is not capped at the
teachers' accuracy. For a classification task y is one-hot, f_T(x) is the teacher's
softmax and ℓ is the cross-entropy −Σ_c target_c log p_c; for a regression task ℓ is the
squared error to the mixed target. Classes are on dimension 1, so a dense output (batch,
classes, H, W) is distilled per pixel; pixels labelled -1 have no gold label and are left
out, as the harness's segmentation metrics leave them out. Without annealing the weight is fixed:
target = (1 − w) · y + w · f_T(x).

Sources: the target mixture and the schedule λ = global_step / num_train_steps follow
the official code (google-research/google-research, ``bam/task_specific/classification/
classification_tasks.py``), which uses a teacher temperature of 1. The defaults are that
code's (``bam/configure.py``): teacher annealing on, and without it ``distill_weight`` w = 0.5.

Left out: training the single-task teachers, BERT and GLUE, the official weighting of tasks
in proportion to dataset size^0.75 (by duplicating small datasets and by per-task loss
weights, bam/task_weighting.py), ensembles of teachers and the layer-wise learning-rate decay.
The official loss sums over a mixed batch rather than averaging per task, and its annealed
weight ends at (T - 1) / T rather than 1; the target mixture, the schedule, the teacher
temperature 1 and the defaults here match it (google-research bam/ at 0c1bbe5).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_all_tasks
from reference_impls.metrics import IGNORE_INDEX as IGNORE


def annealing_lambda(progress: float) -> float:
    """λ: the weight on the gold label, linear in the fraction of training done, in [0, 1]."""
    if progress != progress:  # NaN
        raise ValueError("progress is NaN")
    return min(max(float(progress), 0.0), 1.0)


def classification_target(gold: Tensor, teacher_logits: Tensor, lam: float) -> Tensor:
    """λ · one_hot(y) + (1 − λ) · softmax(f_T(x)): a distribution over the classes (dim 1).

    Dense outputs (batch, classes, H, W) get one per pixel; pixels labelled ``IGNORE`` get none
    (all zeros), as they have no gold label to anneal towards.
    """
    teacher = torch.softmax(teacher_logits.detach(), dim=1)
    labelled = gold != IGNORE
    one_hot = F.one_hot(gold.masked_fill(~labelled, 0), teacher.shape[1]).movedim(-1, 1).to(teacher.dtype)
    return (lam * one_hot + (1 - lam) * teacher) * labelled.unsqueeze(1)


def regression_target(gold: Tensor, teacher_pred: Tensor, lam: float) -> Tensor:
    """λ · y + (1 − λ) · f_T(x) for a real-valued output."""
    return lam * gold.to(teacher_pred.dtype) + (1 - lam) * teacher_pred.detach()


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−Σ_c target_c log softmax(logits)_c over the classes (dim 1), mean over the examples
    (and pixels) that have a target; 0 if none has."""
    per_position = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    has_target = target.sum(dim=1) > 0
    return per_position.sum() / has_target.sum().clamp_min(1)


class BAM(nn.Module):
    """Σ_t loss of student t against the teacher-annealed target of task t."""

    name = "bam"

    def __init__(self, regression_tasks: Iterable[str] = (), anneal: bool = True,
                 distill_weight: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
        self.regression_tasks = frozenset(regression_tasks)
        self.anneal = anneal
        self.distill_weight = distill_weight

    def gold_weight(self, progress: float) -> float:
        """λ: linear in training progress when annealing, 1 − w otherwise."""
        return annealing_lambda(progress) if self.anneal else 1.0 - self.distill_weight

    def task_loss(self, task: str, student: Tensor, teacher: Tensor, gold: Tensor, lam: float) -> Tensor:
        if task in self.regression_tasks:
            return (student - regression_target(gold, teacher, lam)).square().mean()
        return soft_cross_entropy(student, classification_target(gold, teacher, lam))

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
                gold: Mapping[str, Tensor], progress: float) -> Tensor:
        """``progress`` = step / total steps; every dict maps a task to its batch."""
        require_all_tasks("teacher outputs", teacher, student)
        require_all_tasks("gold labels", gold, student)
        lam = self.gold_weight(progress)
        return torch.stack([
            self.task_loss(t, student[t], teacher[t], gold[t], lam) for t in student
        ]).sum()
