"""The two contracts every optimization method in this package follows.

Loss weighting (``LossWeighting``): the method sees the K task losses of a step and
returns K weights; the training loop minimises ``sum_k w_k * L_k``. Stateful methods
(DWA's loss history, UW's log-variances, FAMO's logits) keep that state on the object;
learnable state is registered as ``nn.Parameter`` so ``weighting.parameters()`` can be
handed to an optimizer.

Gradient methods (``GradientMethod``): the method sees the K x d matrix of per-task
gradients of the shared parameters (row k = dL_k/dθ) and returns the d-vector update
direction, plus task weights where the method defines them. The update is used like
an ordinary gradient: ``θ <- θ - lr * update``.

Many gradient methods only need the K x K Gramian ``G Gᵀ`` to choose weights, then
combine the rows with them (``GramianWeighting``). This keeps the cost at O(K²d) for
the Gramian and makes the solver independent of d; it also lets the same method act
on representation-level gradients (MGDA-UB).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference_impls.buffers import resize_empty_buffers


class LossWeighting(nn.Module, ABC):
    """Maps the K task losses of one step to K weights.

    Subclasses implement :meth:`weights`. ``losses`` is a 1-D tensor of K scalars that may
    carry autograd history; the returned weights are detached unless the method learns
    them through the loss (UW, for instance, returns a differentiable combination via
    :meth:`combine`).
    """

    #: The extra call a training loop must make each step for the method to be itself
    #: (GradNorm's ``balance_step``, MOML's ``meta_step``...); None when ``weights`` /
    #: ``combine`` is all it needs. ``reference_impls.train`` refuses a method whose hook
    #: it does not drive, rather than train it silently as equal weighting.
    training_hook: ClassVar[str | None] = None

    @abstractmethod
    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        """Return a 1-D tensor of K task weights for this step."""

    def combine(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        """Return the scalar objective the training loop back-propagates."""
        return (self.weights(losses, step=step, epoch=epoch) * losses).sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """State sized on first use (GradNorm's and LBTW's initial losses) is an empty buffer;
        a fresh object must still load a trained one's checkpoint."""
        resize_empty_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class Aggregation:
    """Result of a gradient method: the d-vector update and, if defined, K task weights."""

    update: Tensor
    weights: Tensor | None = None


class GradientMethod(ABC):
    """Maps a K x d matrix of per-task gradients to one d-vector update.

    Convention, unless a method's docstring says otherwise: equal weighting means the
    *sum* of the rows (weights all 1), matching ``(sum_k L_k).backward()``.
    Randomised methods take a ``torch.Generator`` in their constructor or call.
    """

    #: As ``LossWeighting.training_hook``: the extra per-step call the method needs, if any.
    training_hook: ClassVar[str | None] = None

    @abstractmethod
    def __call__(self, grads: Tensor) -> Aggregation:
        """Aggregate ``grads`` (shape K x d, any float dtype and device)."""


class GramianWeighting(GradientMethod):
    """A gradient method whose weights depend on the rows only through G Gᵀ."""

    @abstractmethod
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Return K weights from the K x K Gramian of the task gradients."""

    def __call__(self, grads: Tensor) -> Aggregation:
        weights = self.weights_from_gramian(grads @ grads.T)
        return Aggregation(update=weights @ grads, weights=weights)


class EpochLossMeans(nn.Module):
    """Running per-task mean of the losses of each epoch (the last three epochs kept).

    DWA and LSB weight tasks by how their epoch-mean losses changed between past epochs.
    A module so that the history travels with ``.to()`` and in the owner's ``state_dict``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[int, Tensor] = {}
        self._counts: dict[int, int] = {}

    def get_extra_state(self) -> dict:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def set_extra_state(self, state: dict) -> None:
        self._sums, self._counts = dict(state["sums"]), dict(state["counts"])

    def _apply(self, fn, recurse: bool = True):
        self._sums = {epoch: fn(total) for epoch, total in self._sums.items()}
        return super()._apply(fn, recurse)

    def record(self, losses: Tensor, epoch: int) -> None:
        self._sums[epoch] = self._sums.get(epoch, torch.zeros_like(losses)) + losses.detach()
        self._counts[epoch] = self._counts.get(epoch, 0) + 1
        for old in [e for e in self._sums if e < epoch - 2]:
            del self._sums[old], self._counts[old]

    def mean(self, epoch: int) -> Tensor | None:
        """Mean loss per task over the steps recorded in ``epoch`` (None if unseen)."""
        if epoch not in self._sums:
            return None
        return self._sums[epoch] / self._counts[epoch]


def check_gradient_matrix(grads: Tensor) -> None:
    """Raise a clear error for input that is not a K x d floating matrix."""
    if grads.ndim != 2:
        raise ValueError(f"expected a K x d gradient matrix, got shape {tuple(grads.shape)}")
    if not torch.is_floating_point(grads):
        raise TypeError(f"expected a floating-point gradient matrix, got {grads.dtype}")
