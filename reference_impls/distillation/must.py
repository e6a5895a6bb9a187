"""MuST: multi-task self-training, specialised teachers pseudo-label one shared unlabeled set.

Ghiasi, Zoph, Cubuk, Le, Lin, "Multi-Task Self-Training for Learning General
Representations", ICCV 2021, arXiv:2108.11353. The method is a three-step procedure
(the paper's Sec. 3 and Fig. 1); it has no numbered update equation.

Labelled data sets rarely carry every task's labels. MuST (1) trains one specialised
teacher per task on its own labelled data set, (2) runs every teacher over a single shared
unlabeled image set, so that each image gets a pseudo label for every task, and (3) trains
one multi-task student on that pseudo-labelled set with the weighted sum of task losses

    L = Σ_t w_t · L_t(student_t(x), pseudo_t(x)).

The kind of pseudo label follows the task:
- classification: the teacher's soft class distribution (its softmax);
- dense classification (segmentation): the teacher's arg-max class at each pixel, with
  pixels whose top probability is below a confidence threshold marked "ignore";
- regression (depth, normals): the teacher's prediction itself.

The student then needs one ordinary supervised loss per task: soft cross-entropy,
cross-entropy that skips ignored pixels, and (our choice here) an L1 distance for
regression. Teachers are frozen; pseudo labels are computed once, under ``no_grad``.

Secondary details not verified against the PDF: the default confidence threshold of 0.5
for segmentation pixels and the L1 regression loss are as we recall the paper; both are
arguments here.

Left out: detection pseudo labels (boxes above a score threshold), the teachers' own
training, partially labelled images mixing gold and pseudo labels, data augmentation of
the student, the loss-weight search and the large-scale JFT / ImageNet runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_all_tasks, require_at_least, require_known_tasks
from reference_impls.metrics import IGNORE_INDEX as IGNORE  # also: pixels too uncertain to train on

KINDS = ("classification", "segmentation", "regression")


def soft_labels(logits: Tensor) -> Tensor:
    """Classification pseudo label: the teacher's class distribution (classes on dim 1)."""
    return torch.softmax(logits, dim=1)


def hard_labels(logits: Tensor, threshold: float) -> Tensor:
    """Segmentation pseudo label: arg-max class per pixel, ``IGNORE`` where confidence < threshold."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
    return torch.where(confidence >= threshold, labels, torch.full_like(labels, IGNORE))


@torch.no_grad()
def pseudo_label(kinds: Mapping[str, str], teachers: Mapping[str, nn.Module], x: Tensor,
                 threshold: float = 0.5) -> dict[str, Tensor]:
    """Step 2: every frozen teacher labels the same unlabeled batch ``x`` for its task."""
    labels = {}
    for task, teacher in teachers.items():
        out = teacher(x)
        if kinds[task] == "classification":
            labels[task] = soft_labels(out)
        elif kinds[task] == "segmentation":
            labels[task] = hard_labels(out, threshold)
        else:
            labels[task] = out.clone()
    return labels


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−Σ_c q_c log p_c summed over classes (dim 1), mean over the rest."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over confident pixels only; zero (not NaN) when every pixel is ignored."""
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.clamp_min(0), reduction="none")[keep].mean()


class MuST(nn.Module):
    """Step 3: Σ_t w_t L_t of the multi-task student on the teachers' pseudo labels."""

    name = "must"

    def __init__(self, kinds: Mapping[str, str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        unknown = {k for k in kinds.values() if k not in KINDS}
        if unknown:
            raise ValueError(f"task kinds must be among {KINDS}, got {sorted(unknown)}")
        if weights is not None:  # 0 switches a task off; a negative weight would reward moving away
            require_at_least(0, **{f"weights[{t}]": w for t, w in weights.items()})
        self.kinds = dict(kinds)
        self.weights = dict(weights) if weights is not None else {t: 1.0 for t in kinds}

    def task_loss(self, task: str, output: Tensor, label: Tensor) -> Tensor:
        kind = self.kinds[task]
        if kind == "classification":
            return soft_cross_entropy(output, label)
        if kind == "segmentation":
            return masked_cross_entropy(output, label)
        return (output - label).abs().mean()

    def forward(self, student: Mapping[str, Tensor], pseudo: Mapping[str, Tensor]) -> Tensor:
        """``student[t]`` and ``pseudo[t]`` are outputs and pseudo labels for the same images."""
        require_known_tasks("pseudo labels", pseudo, self.kinds)
        require_all_tasks("student outputs", student, pseudo)
        return torch.stack([
            self.weights[t] * self.task_loss(t, student[t], pseudo[t].detach()) for t in pseudo
        ]).sum()
