"""ConFIG: a conflict-free update with equal cosine to every task gradient.

Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025, arXiv:2408.11104 (Sec. 3, the ConFIG operator).

With unit gradients u_k = g_k / ||g_k|| stacked as the rows of U, the direction

    g_v = U⁺ 1            (U⁺ the pseudo-inverse, 1 the all-ones K-vector)

solves U g_v = 1 when the gradients are linearly independent: every u_k · g_v equals 1, so the
update makes the same positive angle with every task gradient and no loss increases to first
order. The paper normalises it, g_u = g_v / ||g_v||, and sets its length to the sum of the
task gradients' projections onto it:

    update = (Σ_k g_k · g_u) g_u.

So the step grows when the gradients agree and shrinks when they nearly cancel; it always
satisfies ||update||² = Σ_k g_k · update.

Computed on the Gramian: U⁺ = Uᵀ (U Uᵀ)⁺ and U Uᵀ is the cosine matrix C, so g_v = Σ_k β_k u_k
with β = C⁺ 1 and ||g_v||² = βᵀ C β. For K = 2 this is the paper's closed form built from the
two gradients' components orthogonal to each other. Degenerate inputs: a zero gradient has
no direction and gets weight 0; when g_v vanishes (e.g. two opposite gradients, where no
conflict-free direction exists) the update is zero. For dependent gradients (K > d, parallel
rows) the pseudo-inverse gives the least-squares direction, as the authors' code does with
``lstsq`` for K > 2 on the CPU (checked against tum-pbs/ConFIG at 9486243; on CUDA its
``lstsq`` assumes full rank); with two parallel gradients their default two-task closed form divides
0 by 0, where this file returns the common direction. Equation numbers are not cited: no
copy of the paper's text was at hand to check them; the two formulas above are those of
the paper's method section as restated in the authors' documentation.

Left out: M-ConFIG (momentum variant that back-propagates one loss per step) and the
authors' optional direction-weight and length models other than the defaults used here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.gradients import InvertingGramianWeighting, rounding_cutoff, solver_dtype


class ConFIG(InvertingGramianWeighting):
    """Pseudo-inverse direction of the unit gradients, rescaled by the sum of projections."""

    name = "config"

    def __init__(self, rcond: float = 1e-10) -> None:
        # Relative cut-off of the pseudo-inverse of the cosine matrix; raised to the rounding
        # level of a lower-precision Gramian (see ``unit_direction_weights``).
        self.rcond = rcond

    @property
    def cutoff_floor(self) -> float:
        """An ill-conditioned low-precision Gramian is formed again in float64 from the rows
        (``gradients.gramian_to_invert``): in float32 its own rounding forced a cut-off that
        dropped a gradient 0.5° out of the others' plane and gave unequal cosines, the property
        ConFIG exists for. ``rcond`` is the float64 cut-off."""
        return self.rcond

    def unit_direction_weights(self, gramian: Tensor, cutoff: float | None = None) -> Tensor:
        """γ with g_u = Σ_k γ_k g_k (all zero when g_v = 0).

        ``cutoff`` is the relative eigenvalue cut-off of the pseudo-inverse. By default it sits
        above the rounding noise of a Gramian *computed* in its dtype (~1e-4 for float32): a
        float32 Gramian of dependent rows has eigenvalues of ~1e-7 that are noise, and
        inverting them as directions shrinks or tilts the update. It is capped at 1e-2 so
        that half-precision Gramians keep their genuine directions (1000·eps would be ~1)."""
        cutoff = rounding_cutoff(gramian.dtype, floor=self.rcond) if cutoff is None else cutoff
        gram = gramian.to(solver_dtype(gramian.device))
        norms = gram.diagonal().clamp_min(0).sqrt()
        inverse = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), 0.0)
        cosine = gram * torch.outer(inverse, inverse)
        beta = torch.linalg.pinv(cosine, rtol=cutoff, hermitian=True) @ (norms > 0).to(gram.dtype)
        length_sq = float(beta @ cosine @ beta)  # ||g_v||²
        if not length_sq > 1e-24 * len(gram):
            return torch.zeros_like(beta)
        return beta * inverse / length_sq**0.5

    def weights_from_gramian(self, gramian: Tensor, cutoff: float | None = None) -> Tensor:
        gamma = self.unit_direction_weights(gramian, cutoff)
        gram = gramian.to(gamma.dtype)
        length = (gram @ gamma).sum()  # Σ_k g_k · g_u
        return (length * gamma).to(gramian.dtype)
