"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023, arXiv:2306.01708.

Task arithmetic adds every entry of every task vector. The paper names two ways this
goes wrong: many entries changed only a little in fine-tuning and merely blur the large,
useful changes of other tasks (redundancy), and where tasks push one weight in opposite
directions, summing cancels both (sign conflict). TIES-Merging removes both before
averaging, in the three steps of the paper's Algorithm 1 (notation as there; p indexes
entries, t tasks):

    Trim:   τ̂_t = τ_t with all but its top-k% entries by magnitude set to 0
    Elect:  γ_m^p = sgn(Σ_t τ̂_t^p)                      (the sign with the larger total mass)
    Merge:  A^p = {t : sgn(τ̂_t^p) = γ_m^p},   τ_m^p = (1/|A^p|) Σ_{t∈A^p} τ̂_t^p
    Result: θ_m = θ_pre + λ τ_m

The trim is global over the whole task vector of a task (all layers at once, as in the
authors' code), the mean is "disjoint": an entry is averaged only over the tasks that
kept it and agree with the elected sign, so a weight changed by one task keeps its full
size instead of being divided by K. Paper defaults: k = 20 %, λ tuned on validation
data (λ = 1 is the plain disjoint mean).

Left out: the paper's validation search for k and λ. The trim keeps exactly
round(k·d) entries per task (ties broken by ``torch.topk``; the authors' ``topk_values_mask``
keeps int(k·d) + 1 and every tie at the threshold: 3 of d = 10 at k = 20 %, here 2); an entry
whose trimmed values sum to exactly 0 gets no elected sign and merges to 0 (the authors' code
assigns it the majority sign of the whole vector instead). Checked against
prateeky2806/ties-merging (src/utils/merge_utils.py): with the same number of kept entries
the merged vectors are identical.

:func:`sign_resolved_rows` returns the task vectors after trim and elect, before the mean:
what AdaMerging++ learns its coefficients over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Merging, require_finite_scale


def trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each row, zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (k) must be in (0, 1], got {density}")
    n_keep = round(density * tau.shape[1])
    keep = torch.zeros_like(tau, dtype=torch.bool)
    keep.scatter_(1, tau.abs().topk(n_keep, dim=1).indices, True)
    return tau * keep


def elect_sign(trimmed: Tensor) -> Tensor:
    """γ_m = sgn(Σ_t τ̂_t): per entry, the sign with the larger total magnitude."""
    return trimmed.sum(dim=0).sign()


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose kept entry has the elected sign; 0 where none has."""
    agrees = (trimmed.sign() == sign) & (trimmed != 0)  # A^p
    total = (trimmed * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def sign_resolved_rows(tau: Tensor, density: float) -> Tensor:
    """Each task's trimmed vector with the entries that disagree with the elected sign set to 0
    (the per-task vectors AdaMerging++ merges; their disjoint mean is TIES-Merging's τ_m)."""
    trimmed = trim(tau, density)
    return trimmed * (trimmed.sign() == elect_sign(trimmed))


class TiesMerging(Merging):
    """``τ_m`` from trim (top-``density``), elect sign and disjoint mean, times ``scale``."""

    name = "ties_merging"

    def __init__(self, density: float = 0.2, scale: float = 1.0):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density (k) must be in (0, 1], got {density}")
        require_finite_scale(scale)
        self.density = density  # k
        self.scale = scale  # λ

    def merge_rows(self, tau: Tensor) -> Tensor:
        trimmed = trim(tau, self.density)  # step 1
        sign = elect_sign(trimmed)  # step 2
        return self.scale * disjoint_mean(trimmed, sign)  # step 3, times λ
