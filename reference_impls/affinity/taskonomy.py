"""Taskonomy: task affinities from transfer results by ordinal (AHP) normalisation, and a budgeted taxonomy.

Zamir, Sax, Shen, Guibas, Malik, Savarese, "Taskonomy: Disentangling Task Transfer Learning",
CVPR 2018, arXiv:1804.08328. Taskonomy trains a network for every source task, then a small
transfer readout from each source's frozen representation (or a set of sources, for higher
orders) to every target, and measures each transfer's loss on held-out images. Raw losses of
different targets live on incomparable scales, and even within a target a loss difference
says little about how much better one transfer is. So the paper normalises ordinally, with
Saaty's Analytic Hierarchy Process (AHP), one target t at a time:

    W_t[i, j] = fraction of test images on which source i's transfer to t has lower loss
                than source j's  (a tournament; 0 on the diagonal),
    W_t clipped to [0.001, 0.999],   W'_t = W_t / W_t^T   (elementwise),

so W'_t[i, j] says how many times more often i beats j than the reverse, and
W'_t[j, i] = 1 / W'_t[i, j]: a reciprocal pairwise-comparison matrix with ones on its
diagonal, which is what AHP ranks. The affinity of every source for t is the principal
(Perron) eigenvector of W'_t, scaled to sum to 1; these vectors, side by side for all
targets, are the affinity matrix. When the comparisons are consistent (W'_t[i, j] = a_i/a_j
for some positive scores a) the eigenvector is exactly a / sum(a) (tested), and because only
which loss is lower matters, any increasing transform of the losses changes nothing (tested).

The taxonomy itself is a subgraph chosen under a supervision budget: a set of tasks gets
labels and its own network (the "sources" actually trained), every target must be either
one of them or be served by one transfer whose sources are all among them, and the total
affinity of what serves the targets (each weighted by the target's importance) is
maximised. The paper solves this as a binary integer program; at toy size
:func:`select_taxonomy` enumerates every supervised set instead, which gives the same optimum
(for a fixed set, each target independently takes its best admissible transfer).

Sources. The official repository (github.com/StanfordVL/taskonomy) has no code for either
step. Its ``results/`` folder holds the normalised affinities and each transfer's win rates
against the target's task-specific network and against a network trained on pixels, and its
README names the step "Ordinal Normalization using Analytic Hierarchy Process (AHP)" (Sec.
3.3 of the paper). In the released affinities (``all_affinities.pkl``, 1k and 16k images)
every target's values sum to 1 over its candidate transfers, first and higher order
together, as the eigenvector scaled here does (checked when this module was written); the
normalised set there also holds the target's own network, a transfer from its own
representation and a random baseline. The
tournament matrix, the clipping and the ratio W_t / W_t^T are the paper's Sec. 3.3 as the
author of this module knows it; the paper's text was not available to check them here, and
its equation numbers are not cited. The selection's constraints (one incoming transfer or
its own supervision per target, never both; a transfer only from supervised sources; the
budget on the supervision costs; the objective weighted by each target's importance) follow
a solver file, ``taxonomy_api.py``, found in a public code index; it loads the released
affinities by their file names, but its repository could not be identified, so it is not
cited as official.

Left out: training the task networks and transfer functions (the caller measures the
losses; any model fits), the paper's choice of which higher-order source sets to measure
(it does not try them all), the binary integer program solver (exhaustive search
here), the transfer-labelling cost per target that the solver also allows, the clipping and
square root that solver applies to affinities before optimising, and the experiments.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Transfer = tuple[tuple[str, ...], str]  # (sources, target)


# ----------------------------------------------------------------------------------------------
# Ordinal normalisation (AHP)
# ----------------------------------------------------------------------------------------------


def win_rates(losses: Tensor) -> Tensor:
    """W[i, j]: fraction of test images on which source i's loss is strictly lower than j's.

    ``losses`` is S x N: one row per source (or source set), one column per test image, all
    for the same target.
    """
    return (losses[:, None, :] < losses[None, :, :]).to(losses.dtype).mean(dim=-1)


def pairwise_ratios(wins: Tensor, low: float = 0.001, high: float = 0.999) -> Tensor:
    """W' = clip(W) / clip(W)^T: how many times more often i beats j than j beats i."""
    clipped = wins.clamp(low, high)
    return clipped / clipped.T


def principal_eigenvector(matrix: Tensor) -> Tensor:
    """The Perron eigenvector of a positive matrix, positive and scaled to sum to 1."""
    values, vectors = torch.linalg.eig(matrix)
    vector = vectors[:, values.real.argmax()].real
    vector = vector * vector.sum().sign()  # eig's sign is arbitrary; the Perron vector has one sign
    return vector / vector.sum()


def ahp_priorities(losses: Tensor) -> Tensor:
    """Affinities of S candidate sources for one target from their S x N test losses."""
    return principal_eigenvector(pairwise_ratios(win_rates(losses)))


def affinity_matrix(losses: Mapping[str, Tensor]) -> Tensor:
    """P (S x T): column t is :func:`ahp_priorities` of target t's S x N losses.

    Every target's rows must list the same S sources in the same order (a source that
    cannot transfer to a target, such as the target itself, is the caller's to leave out or
    to give a loss that always loses).
    """
    return torch.stack([ahp_priorities(l) for l in losses.values()], dim=1)


# ----------------------------------------------------------------------------------------------
# The budgeted taxonomy (subgraph selection), by exhaustive search
# ----------------------------------------------------------------------------------------------


class Taxonomy(NamedTuple):
    supervised: tuple[str, ...]          # tasks that get labels and a network of their own
    served_by: dict[str, Transfer | None]  # per target: its transfer, None if it is supervised itself
    value: float                          # sum over targets of importance x affinity


def _best_transfer(target: str, supervised: set[str], affinities: Mapping[Transfer, float],
                   max_order: int) -> tuple[Transfer | None, float]:
    best, value = None, float("-inf")
    for (sources, t), a in affinities.items():
        if t == target and target not in sources and len(sources) <= max_order \
                and set(sources) <= supervised and a > value:
            best, value = (sources, t), a
    return best, value


def served_value(supervised: set[str], targets: Sequence[str], affinities: Mapping[Transfer, float],
                 own_affinity: Mapping[str, float], importance: Mapping[str, float],
                 max_order: int) -> tuple[dict[str, Transfer | None], float] | None:
    """Given the supervised set: how every target is served and the total, or None if one cannot be."""
    served, total = {}, 0.0
    for t in targets:
        if t in supervised:
            served[t], value = None, own_affinity[t]
        else:
            served[t], value = _best_transfer(t, supervised, affinities, max_order)
            if served[t] is None:
                return None
        total += importance.get(t, 1.0) * value
    return served, total


def select_taxonomy(tasks: Sequence[str], targets: Sequence[str], affinities: Mapping[Transfer, float],
                    own_affinity: Mapping[str, float], cost: Mapping[str, float], budget: float,
                    importance: Mapping[str, float] | None = None, max_order: int = 5) -> Taxonomy | None:
    """The supervised set within ``budget`` (sum of ``cost``) that serves every target best.

    ``tasks`` are all tasks that may be supervised (sources, and targets); ``affinities`` maps
    a transfer (sources, target) to its affinity, ``own_affinity`` a target to the affinity of
    its own fully supervised network. None when no affordable set serves every target.
    """
    importance = {} if importance is None else importance
    best: Taxonomy | None = None
    for size in range(len(tasks) + 1):
        for chosen in itertools.combinations(tasks, size):
            if sum(cost[t] for t in chosen) > budget:
                continue
            result = served_value(set(chosen), targets, affinities, own_affinity, importance, max_order)
            if result is not None and (best is None or result[1] > best.value):
                best = Taxonomy(tuple(chosen), result[0], result[1])
    return best
