"""IMTL-G: the update whose projections onto every unit task gradient are equal.

Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (OpenReview IMPnRXEWpvr),
gradient part. Find d = Σ_k α_k g_k with Σ_k α_k = 1 such that d · u_k is the same for all
k, where u_k = g_k / ||g_k||. The paper's closed form is
α_{2:K} = g_1 Uᵀ (D Uᵀ)^{-1} with D, U the rows g_1 − g_k and u_1 − u_k.

We solve the same conditions on the Gramian, written in a scale-free way: with n_k = ||g_k||
and the cosine matrix C_ij = g_i·g_j / (n_i n_j), set β_k = α_k n_k; then d · u_i = (Cβ)_i,
so equal projections mean Cβ ∝ 1. Hence β = C⁻¹1 and α_k = β_k / n_k, rescaled so Σ α = 1.
This is exact for linearly independent gradients whatever their scales (1e-10 and 1e10 in
the same matrix are fine). For dependent unit gradients C is singular. If 1 is still in its
range, the pseudo-inverse gives a solution (e.g. parallel gradients). If it is not (two
opposite gradients, alone or among others, or three coplanar ones: typically whenever K
exceeds the rank of the rows), no direction has equal non-zero projections and the
solutions are the combinations with d = 0: β in the null space of C. That is also the limit
of nearly dependent gradients, whose update shrinks to 0 as they approach the dependency,
so we take the null-space β nearest to (1/n_k) (then Σ β_k/n_k > 0). Zero gradients
have no direction and get weight 0. If Σ β_k/n_k vanishes no normalised solution exists and
we fall back to uniform weights.

Convention: α sums to 1 (the paper's constraint), not the package's default sum.
Checked against LibMTL's re-implementation (``LibMTL/weighting/IMTL.py``): for independent
gradients its weights, from the closed form above with a plain matrix inverse, equal ours;
it has no handling of zero or dependent gradients, where that inverse or u_k is undefined.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from reference_impls.weighting.gradients import InvertingGramianWeighting, rounding_cutoff


class IMTLG(InvertingGramianWeighting):
    """Closed-form impartial weights: equal projections onto unit gradients, Σ α = 1.

    The K x K solve runs on the host in float64 NumPy, where each operation on so small an
    array costs about a microsecond instead of the several of a torch call; the result goes
    back to the Gramian's device and dtype.
    """

    name = "imtl_g"

    # Calls go through InvertingGramianWeighting: an ill-conditioned low-precision Gramian is formed
    # again in float64 from the rows (in float32 its own rounding forced a cut-off that dropped a
    # gradient 0.5° out of the others' plane: weights 2 % off float64's).

    def weights_from_gramian(self, gramian: Tensor, cutoff: float | None = None) -> Tensor:
        """``cutoff`` defaults to the rounding level of a Gramian computed in its dtype."""
        gram = gramian.detach().to("cpu", torch.float64).numpy()
        k = len(gram)
        norms = np.sqrt(np.maximum(np.diagonal(gram), 0))
        live = norms > 0
        # 1/n_k, and 0 for zero rows: their cosine row/column is 0, so the pseudo-inverse gives
        # them β_k = 0, the same as leaving them out (pinv of diag(C, 0) is diag(pinv C, 0)).
        inverse = np.divide(1.0, norms, out=np.zeros(k), where=live)
        cutoff = rounding_cutoff(gramian.dtype, floor=self.cutoff_floor) if cutoff is None else cutoff
        cosine = gram * np.outer(inverse, inverse)
        beta = solve_cosine_system(cosine, live.astype(np.float64), cutoff)
        if not reaches_ones(cosine, beta, live, cutoff):  # e.g. opposite gradients: d = 0
            beta = null_combination(cosine, inverse, cutoff)
        alpha = beta * inverse
        total = alpha.sum()
        if np.isfinite(alpha).all() and abs(total) > 1e-12 * np.abs(alpha).sum():
            weights = alpha / total
        else:  # no normalised solution: uniform weights
            weights = np.full(k, 1.0 / k)
        return torch.from_numpy(weights).to(gramian.device, gramian.dtype)


def reaches_ones(cosine: np.ndarray, beta: np.ndarray, live: np.ndarray, cutoff: float) -> bool:
    """Whether Cβ = 1 on the live rows, i.e. 1 is in the range of C and some direction has equal
    non-zero projections. On a singular C, β is the pseudo-inverse's least-squares answer: it
    misses 1 by 1's part along the dropped eigenvectors (0.12 for three coplanar rows, 1 for
    opposite ones), while a genuine solution misses it by the Gramian's rounding (below the
    cut-off) or by float64's, amplified by at most 1/cutoff (about 1e-6 for float64)."""
    return float(np.abs(cosine @ beta - live).max()) <= max(cutoff, 1e-5)


def null_combination(cosine: np.ndarray, inverse: np.ndarray, cutoff: float) -> np.ndarray:
    """β in the null space of C nearest to (1/n_k): Σ β_k u_k = 0, so every projection of
    d = Σ β_k u_k / Σ β_k/n_k is 0, and Σ β_k/n_k = ||P(1/n)||² is positive unless that space
    is orthogonal to (1/n). For nearly opposite g_1, g_2 the weights tend to this β/n too."""
    values, vectors = np.linalg.eigh(cosine)
    null = vectors[:, values <= cutoff * max(float(values.max()), 1.0)]
    return null @ (null.T @ inverse)


def solve_cosine_system(cosine: np.ndarray, live: np.ndarray, cutoff: float = 1e-10) -> np.ndarray:
    """β = C⁻¹1 (1 on live rows). Independent gradients give a well-conditioned C with a unit
    diagonal: its Cholesky factor exists with no squared pivot below 100 · cutoff, and a plain
    solve is exact to rounding. Dependent or zero rows go to the pseudo-inverse, which gives a
    solution whenever one exists (e.g. parallel gradients). The cut-off must sit above the
    rounding noise of the Gramian's dtype (1e-10 for float64, ~1e-4 for float32, capped at 1e-2
    for half precision, where 1000 eps is about 1): that noise on a singular C would otherwise
    be inverted as if it were a direction."""
    try:
        if np.diagonal(np.linalg.cholesky(cosine)).min() ** 2 > 100 * cutoff:
            return np.linalg.solve(cosine, live)
    except np.linalg.LinAlgError:
        pass
    return np.linalg.pinv(cosine, rcond=cutoff, hermitian=True) @ live
