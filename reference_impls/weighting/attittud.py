"""ATTITTUD: split every auxiliary gradient into the part that helps, hurts or leaves the primary task.

Dery, Dauphin & Grangier, "Auxiliary Task Update Decomposition: The Good, The Bad and The
Neutral", ICLR 2021, arXiv:2108.11346 (OpenReview 1GTma8HwlYp), Section 3, checked against the
authors' code (github.com/ldery/ATTITTUD, ``algorithms/algos.py``). Equation numbers are not
given here: only the paper's abstract and introduction could be read from this machine, so the
rule below follows the official code, which implements the paper's decomposition.

The method in our words. One task is the *primary* task; the others only matter through what
they do to it. Take an orthonormal basis V (r x d, r small) of the subspace S spanned by the
primary task's per-example gradients. An auxiliary gradient g splits into its part inside S,
Vᵀ(Vg), and the rest g⊥ = g − VᵀVg, which is orthogonal to every per-example primary gradient
and so, to first order, changes no primary loss at all (the *neutral* part). Inside S each basis
direction v_i is judged on its own: if the auxiliary coordinate (Vg)_i has the same sign as the
coordinate (Vḡ)_i of the primary mean gradient ḡ, moving along it lowers the primary loss (the
*helpful* part g+); otherwise it raises it (the *harmful* part g−). The auxiliary gradient is
replaced by

    g̃ = η+ g+  +  η− g−  +  η⊥ g⊥

and the shared parameters step along ḡ + Σ_aux g̃_aux (unit task weights: the authors'
multitask mode instead mixes ḡ and g̃ with weights proportional to the two batch sizes, which
sum to 1). (η+, η−, η⊥) = (1, 1, 1) gives back the plain sum; η− = 0 drops every direction
that conflicts with the primary task; the paper's framework also covers e.g. η− < 0 (reverse
the harmful part) and η⊥ = 0 (keep only what the primary task can see).

K x d contract: row 0 is the primary mean gradient ḡ, rows 1..K−1 are auxiliary tasks, each
decomposed on its own and the results summed (the paper has one auxiliary task). By default S is
the span of row 0 (r = 1): then g+ or g− is the projection of g onto ḡ, chosen by the sign of
g·ḡ. ``set_primary_examples`` sets S from a matrix of per-example primary gradients instead; it
stays until set again, as the authors' code refreshes its basis every ``pca_every`` steps.
Defaults (η+, η−, η⊥) = (1, 0, 1) are our choice (keep help and neutral, drop harm). In the
authors' code the trainer class defaults to (1, 1, 1), plain summation, its command line to
(η+, η−, η⊥) = (0, 0, 1), neutral part only, and the README's ATTITTUD run uses (1, −1, 1).

A zero coordinate of ḡ counts as disagreement (the code's strict ``> 0``), so such a
direction goes to g−. With a zero primary gradient S is empty and all of g is neutral.

Left out: the randomized basis that makes S affordable for big models (the authors draw
random vector-Jacobian products over 30 examples and orthonormalise them by Gram-Schmidt, a
20-dimensional subspace by default, with no SVD; we take an exact SVD of the per-example rows
we are given). Which directions count as helpful or harmful depends on the basis, not only on
the subspace: on one subspace the two bases' updates differed by 1.4 against a norm of 7.6 in
the audit. Also left out: the standardisation statistics of the authors' code (a no-op there),
the README run's mode that leaves the primary gradient out of the shared update, the separate batch they draw for ḡ, the restriction to
selected layers, the batch-size task weights (with the option to drop the auxiliary term once
its loss is below a floor), and gradient clipping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from reference_impls.checks import require_positive
from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class Decomposition(NamedTuple):
    """Helpful, harmful and neutral parts of each auxiliary row (each M x d); they sum to the rows."""

    positive: Tensor
    negative: Tensor
    neutral: Tensor


def orthonormal_basis(rows: Tensor, rank: int | None = None) -> Tensor:
    """r x d orthonormal basis of the span of ``rows``: its top right singular vectors.

    Directions with singular values below rounding level (relative to the largest) are dropped,
    so dependent or zero rows do not add noise directions; ``rank`` keeps at most that many.
    """
    check_gradient_matrix(rows)
    work = rows.to(torch.float64)
    scale = work.abs().max()
    if not scale > 0:
        return rows.new_zeros(0, rows.shape[1])
    _, singular, vh = torch.linalg.svd(work / scale, full_matrices=False)
    keep = int((singular > singular[0] * max(work.shape) * torch.finfo(torch.float64).eps).sum())
    if rank is not None:
        keep = min(keep, rank)
    return vh[:keep].to(rows.dtype)


def decompose(auxiliary: Tensor, basis: Tensor, primary: Tensor) -> Decomposition:
    """Split each row of ``auxiliary`` (M x d) against the subspace of ``basis`` (r x d).

    The sign reference for each basis direction is the coordinate of ``primary`` (d) along it.
    """
    coords = auxiliary @ basis.T  # M x r: (Vg)_i
    agree = coords.sign() * (basis @ primary).sign() > 0  # same sign as (Vḡ)_i: helps the primary task
    positive = torch.where(agree, coords, 0) @ basis
    negative = torch.where(agree, 0, coords) @ basis
    return Decomposition(positive, negative, auxiliary - positive - negative)  # g⊥ = g − VᵀVg


class ATTITTUD(GradientMethod):
    """ḡ + Σ_aux (η+ g+ + η− g− + η⊥ g⊥), with row 0 the primary task."""

    name = "attittud"

    def __init__(self, eta_pos: float = 1.0, eta_neg: float = 0.0, eta_neutral: float = 1.0,
                 rank: int | None = None) -> None:
        self.eta_pos, self.eta_neg, self.eta_neutral = float(eta_pos), float(eta_neg), float(eta_neutral)
        if rank is not None:
            require_positive(rank=rank)
        self.rank = rank
        self.basis: Tensor | None = None  # None: the span of row 0 at each call

    def set_primary_examples(self, examples: Tensor | None) -> None:
        """Use the span of these per-example primary gradients (N x d) as S; None: back to row 0."""
        self.basis = None if examples is None else orthonormal_basis(examples.detach(), self.rank)

    def subspace(self, primary: Tensor) -> Tensor:
        """Basis of S on the input's device and dtype."""
        if self.basis is not None:
            return self.basis.to(primary)
        norm = primary.norm()
        if not norm > 0:
            return primary.new_zeros(0, primary.numel())
        return (primary / norm)[None]

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        primary, auxiliary = grads[0], grads[1:]
        basis = self.subspace(primary)
        parts = decompose(auxiliary, basis, primary)
        combined = self.eta_pos * parts.positive + self.eta_neg * parts.negative + self.eta_neutral * parts.neutral
        update = primary + combined.sum(0)
        weights = self.row_weights(grads, basis) if self.basis is None else None
        return Aggregation(update=update, weights=weights)

    def row_weights(self, grads: Tensor, basis: Tensor) -> Tensor:
        """With S = span(ḡ) the update is a combination of the rows: w_0 = 1 + Σ_k (η_k − η⊥) a_k/||ḡ||.

        a_k = g_k·ḡ/||ḡ|| is row k's coordinate along ḡ and η_k is η+ or η− by its sign; each
        auxiliary row keeps weight η⊥.
        """
        weights = torch.full((len(grads),), self.eta_neutral, dtype=grads.dtype, device=grads.device)
        weights[0] = 1.0
        if len(basis) == 0:
            return weights
        coords = grads[1:] @ basis[0]
        eta = torch.where(coords > 0, coords.new_tensor(self.eta_pos), coords.new_tensor(self.eta_neg))
        weights[0] += ((eta - self.eta_neutral) * coords).sum() / grads[0].norm()
        return weights
