"""CILICIA: learn the strongly correlated attribute tasks first, then transfer to the weakly correlated.

Sarafianos, Giannakopoulos, Nikou, Kakadiaris, "Curriculum Learning for Multi-Task
Classification of Visual Attributes", ICCV Workshops (TASK-CV) 2017, arXiv:1708.08728.

Many binary attributes of a person (gender, hat, backpack, ...) are predicted from one image.
Training them all at once lets tasks that share little with the others disturb the shared
features. CILICIA orders the tasks by how correlated their labels are with the rest and learns
in two stages, a curriculum over groups of tasks rather than over examples:

    1. grouping: Pearson correlation ρ_ij of the training labels of tasks i and j; a task's
       strength is its mean |ρ_ij| over the other tasks; tasks are sorted by strength and cut
       into a strongly correlated group S and a weakly correlated group W;
    2. stage 1: a multi-task network (shared layers + one head per task) is trained on S only;
    3. stage 2: a network for W starts from the shared layers learned in stage 1 (the
       transfer of knowledge) and is trained, again multi-task, on W.

Strongly correlated tasks support each other, so they are learned first and more easily; the
weakly correlated tasks then start from features that already describe the person.

Sources: the grouping by label correlation into a strong and a weak group, strong-first
multi-task training within each group and the transfer to the weak group follow the paper's
abstract and introduction. Not verified against the method section, which could not be
consulted here, and therefore our choices: the strength statistic (mean absolute correlation),
the cut (the strongest half by default, ``strong_fraction`` = 0.5, rounded up: ⌈T/2⌉ tasks,
3 of 5) and the transfer by copying every
shared parameter whose name and shape match. Equations are named, not numbered.

Left out: the CNN, data sets and training recipe; any extra loss terms the paper may use in
stage 2 (not verified here); the later journal version's hierarchical clustering into more
than two groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reference_impls.checks import require_non_negative


def label_correlation(labels: Tensor) -> Tensor:
    """T x T Pearson correlation of the columns of an N x T label matrix (constant column: ρ = 0)."""
    centred = labels - labels.mean(dim=0, keepdim=True)
    norms = centred.norm(dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    corr = (centred.T @ centred) / (safe[:, None] * safe[None, :])
    corr = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), corr, torch.zeros_like(corr))
    return corr.fill_diagonal_(1.0)


def correlation_strength(corr: Tensor) -> Tensor:
    """Mean |ρ_ij| of each task i over the other tasks j ≠ i (0 for a single task)."""
    t = corr.shape[0]
    if t == 1:
        return torch.zeros(1, dtype=corr.dtype, device=corr.device)
    off_diagonal = corr.abs().sum(dim=1) - corr.diagonal().abs()
    return off_diagonal / (t - 1)


def split_by_correlation(corr: Tensor, strong_fraction: float = 0.5) -> tuple[list[int], list[int]]:
    """(strong, weak): tasks sorted by decreasing strength, the first ⌈fraction · T⌉ are strong."""
    if not 0 < strong_fraction <= 1:
        raise ValueError(f"strong_fraction must be in (0, 1], got {strong_fraction}")
    strength = correlation_strength(corr).tolist()
    order = sorted(range(len(strength)), key=lambda i: (-strength[i], i))
    cut = max(1, math.ceil(strong_fraction * len(order)))
    return order[:cut], order[cut:]


def transfer_shared(source: nn.Module, target: nn.Module, skip: tuple[str, ...] = ("heads",)) -> list[str]:
    """Stage-2 initialisation: copy parameters matching in name and shape, except ``skip`` prefixes.

    Only tensors are compared: a module's extra state (PathNet's pathways, say) is not a layer
    of the shared trunk and is left as it is.
    """
    own = target.state_dict()
    copied = [
        name for name, value in source.state_dict().items()
        if isinstance(value, Tensor) and isinstance(own.get(name), Tensor)
        and own[name].shape == value.shape and not name.startswith(skip)
    ]
    target.load_state_dict({name: source.state_dict()[name] for name in copied}, strict=False)
    return copied


class CILICIASchedule:
    """Ask ``tasks_to_train(epoch)`` / ``task_weights(epoch)``; stage 2 starts at ``stage1_epochs``."""

    name = "cilicia"

    def __init__(self, labels: Tensor, stage1_epochs: int, strong_fraction: float = 0.5) -> None:
        if labels.ndim != 2:
            raise ValueError(f"need an N x T label matrix, got shape {tuple(labels.shape)}")
        require_non_negative(stage1_epochs=stage1_epochs)
        self.num_tasks = labels.shape[1]
        self.correlation = label_correlation(labels.to(torch.float64))
        self.strong, self.weak = split_by_correlation(self.correlation, strong_fraction)
        self.stage1_epochs = stage1_epochs

    def stage(self, epoch: int) -> int:
        """1 while the strong group trains, 2 afterwards; always 1 if there is no weak group."""
        return 2 if self.weak and epoch >= self.stage1_epochs else 1

    def tasks_to_train(self, epoch: int) -> list[int]:
        return list(self.strong if self.stage(epoch) == 1 else self.weak)

    def task_weights(self, epoch: int, like: Tensor | None = None) -> Tensor:
        """0/1 weight per task for this epoch's multi-task loss, on ``like``'s device and dtype."""
        weights = torch.zeros(self.num_tasks, dtype=torch.float64)
        weights[self.tasks_to_train(epoch)] = 1.0
        return weights if like is None else weights.to(like)
