"""Task arithmetic: add the task vectors, scaled by one coefficient.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models
with Task Arithmetic", ICLR 2023, arXiv:2212.04089.

A task vector ``τ_t = θ_t − θ_pre`` is a direction in weight space that improves task t.
Adding several of them to the pre-trained weights gives one model for all the tasks
(the paper's "learning via addition"):

    θ_m = θ_pre + λ Σ_t τ_t

with a single scale λ chosen on held-out validation data. It is the baseline that
TIES-Merging and AdaMerging improve on: every entry of every task vector is kept, so
small, redundant changes and changes of opposite sign interfere.

Left out: task analogies and sums that negate some vectors and add others (one vector with
λ < 0 is negation, forgetting that task); the paper's search of λ on validation data is the
caller's job (the authors' released code has no search either, only a fixed coefficient).

Checked against mlfoundations/task_vectors, src/task_vectors.py (``TaskVector``: subtraction,
``__add__``, ``__neg__``, ``apply_to`` with ``scaling_coef`` 1 by default) and its README.
There fine-tuning freezes each task's classification head and saves the image encoder only,
so task vectors cover the shared encoder and every task keeps its own head; here whatever
state the caller passes is merged, so pass the shared part to follow the paper.
Integer entries of the state dict (int64, uint8 buffers) stay out of the task vector in both,
so they keep their pre-trained values (here every non-floating entry does: ``base.py``).
Difference: keys missing from some vectors are skipped with a warning there and refused here.
"""

from __future__ import annotations

from torch import Tensor

from .base import Merging, require_finite_scale


class TaskArithmetic(Merging):
    """``τ_m = λ Σ_t τ_t``."""

    name = "task_arithmetic"

    def __init__(self, scale: float = 1.0):
        require_finite_scale(scale)
        self.scale = scale  # λ

    def merge_rows(self, tau: Tensor) -> Tensor:
        return self.scale * tau.sum(dim=0)
