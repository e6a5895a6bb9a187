"""UPGrad: average of the projections of every task gradient onto the dual cone of all of them.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232
(the aggregator of the TorchJD library). The dual cone of the rows is
C = {x : g_k · x >= 0 for all k}: directions that increase no loss to first order (for
the update used as a gradient, θ <- θ − lr·x). UPGrad returns

    A(G) = (1/K) Σ_i π_C(g_i)

so its result is in C (no conflict with any task) and equals the mean when the rows do not
conflict. Each projection is a small quadratic program on the Gramian M = G Gᵀ:
π_C(Gᵀu) = Gᵀv with v = argmin_{v >= u} vᵀ M v. Writing v = e_i + s, s >= 0, it is the
non-negative least-squares problem min_{s>=0} ½ sᵀMs + (M e_i)ᵀ s. All K of them share M,
so we solve them together, exactly, with the batched active-set solver in gradients.py
(its first guess: s_j > 0 exactly for the tasks j that conflict with task i); K = 2 has a
closed form. TorchJD solves them one by one with a generic QP solver and a small regulariser
instead.

Equation numbers are those of arXiv:2406.16232v3 (3 Feb 2025), a Markdown transcript of
arXiv:2406.16232 in the public GitHub index (file id 32569832295): there the projection π_C
is Eq. (3), A(G) above Eq. (4), Proposition 1 the QP Eq. (5), and the averaged weights Eq. (6).

Checked against TorchJD (TorchJD/torchjd: src/torchjd/aggregation/_upgrad.py,
_utils/dual_cone.py, _utils/pref_vector.py, src/torchjd/_linalg/_gramian.py), whose
dual_cone.py names the projection Eq. (3) of the paper and its QP form Proposition 1.
There, M is divided by its trace and 1e-4·I is added before quadprog runs, so each
projection is taken for M + 1e-4·tr(M)·I and lands only near the cone; and when
tr(M) < 1e-4 (an absolute threshold) M is replaced by zero, so small gradients are averaged
without projection. Here the solve is exact and does not depend on the scale of the rows.
Left out: TorchJD's ``pref_vector``, which replaces the 1/K weights of the projected rows.

Convention: *mean* over tasks, as in the paper: weights = (1/K) Σ_i v_i; they equal 1/K
each when no pair of rows conflicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.gradients import nonnegative_quadratic_minima, normalized_gramian, solver_dtype


def dual_cone_projection_weights(gramian: Tensor, preference: Tensor) -> Tensor:
    """v = argmin_{v >= u} vᵀMv, so that Gᵀv is the projection of Gᵀu onto the dual cone.

    ``preference`` is one vector u (K) or a batch of them (B x K, one projection per row).
    """
    matrix, scale = normalized_gramian(gramian)  # v does not depend on the scale of M
    u = preference.to(matrix)
    if scale == 0.0:
        return u
    batch = u.reshape(-1, len(matrix))
    slack = nonnegative_quadratic_minima(matrix, -(batch @ matrix))  # row b: p = −M u_b
    return u + slack.reshape(u.shape)


class UPGrad(GramianWeighting):
    """Mean of the dual-cone projections of the rows; exact QPs on the Gramian."""

    name = "upgrad"

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        k = len(gramian)
        if k == 2:
            return self.two_task_weights(gramian)
        identity = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
        projections = dual_cone_projection_weights(gramian, identity)  # row i: v for u = e_i
        return projections.mean(0).to(gramian.dtype)

    @staticmethod
    def two_task_weights(gramian: Tensor) -> Tensor:
        """K = 2 in closed form: if g_1·g_2 < 0, g_1 is projected onto the half-space
        g_2·x >= 0, g_1 − (g_1·g_2 / ||g_2||²) g_2, which already has g_1·x >= 0 (Cauchy–Schwarz),
        so it is the projection onto the cone; likewise for g_2. Otherwise nothing moves."""
        gram = gramian.to(solver_dtype(gramian.device))
        conflict = (-gram[0, 1]).clamp_min(0)
        diagonal = gram.diagonal()
        shifts = torch.where(diagonal > 0, conflict / diagonal, 0)  # (on g_1 from v_2, on g_2 from v_1)
        return ((1 + shifts) / 2).to(gramian.dtype)
