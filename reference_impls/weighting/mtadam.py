"""MTAdam: Adam with per-loss, per-layer gradient magnitude balancing.

Malkiel & Wolf, "MTAdam: Automatic Balancing of Multiple Training Loss Terms",
arXiv:2006.14683.

For each layer l (a block of the parameters) and loss term k, MTAdam

1. tracks a running norm n_{k,l} ← β3 n_{k,l} + (1 - β3) ||g_{k,l}|| (first step: the
   norm itself);
2. rescales the loss's gradient to the magnitude of the anchor (first) loss, times a
   user rank r_k:  g̃_{k,l} = r_k · n_{anchor,l} / n_{k,l} · g_{k,l};
3. keeps separate Adam moments per loss, m_k ← β1 m_k + (1-β1) g̃_k and
   v_k ← β2 v_k + (1-β2) g̃_k², and
4. steps with all first moments over the *largest* second-moment denominator:

       θ ← θ - lr · sum_k (m_k / (1 - β1^t)) / max_k ( sqrt(v_k / (1 - β2^t)) + ε ).

Interface: MTAdam is an optimizer, expressed here as a ``GradientMethod`` so it reads
like the others. Call it with the K x d matrix of per-task gradients; ``layer_sizes``
(numel of each shared parameter tensor, in the order used to flatten them; default one
block) define the layers: the authors' optimizer always balances per parameter tensor (with
those sizes it matched theirs to 2.2e-16 over 50 steps in the audit) and applies to the heads
too; its ``weight_decay`` and ``amsgrad`` options are not here. ``Aggregation.update`` is the whole Adam direction, so apply it
with plain SGD without momentum, θ ← θ - lr · update. The anchor of a layer is the
first loss whose running norm there exceeds 1e-10; a loss whose norm is below that
keeps its gradient unscaled, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix

_TINY_NORM = 1e-10


class MTAdam(GradientMethod):
    """Per-loss Adam moments on layer-wise magnitude-balanced gradients."""

    name = "mtadam"

    def __init__(
        self,
        layer_sizes: Sequence[int] | None = None,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        eps: float = 1e-8,
        ranks: Sequence[float] | None = None,
    ) -> None:
        self.layer_sizes = list(layer_sizes) if layer_sizes is not None else None
        self.betas = betas
        self.eps = eps
        self.ranks = ranks
        self.step = 0
        self.norms: Tensor | None = None  # K x layers
        self.first_moments: Tensor | None = None  # K x d
        self.second_moments: Tensor | None = None  # K x d

    def _balance(self, grads: Tensor) -> Tensor:
        """Steps 1-2: rescale each loss's gradient, layer by layer, to the anchor's norm."""
        sizes = self.layer_sizes or [grads.shape[1]]
        blocks = torch.split(grads, sizes, dim=1)
        current = torch.stack([block.norm(dim=1) for block in blocks], dim=1)  # K x layers
        beta3 = self.betas[2]
        self.norms = current if self.step == 1 else beta3 * self.norms + (1 - beta3) * current
        ranks = torch.ones(grads.shape[0]) if self.ranks is None else torch.as_tensor(self.ranks)
        ranks = ranks.to(grads)
        balanced = []
        for layer, block in enumerate(blocks):
            norms = self.norms[:, layer]
            alive = norms > _TINY_NORM
            anchor = norms[alive][0] if bool(alive.any()) else norms.new_tensor(1.0)
            scale = torch.where(alive, ranks * anchor / norms.clamp_min(_TINY_NORM), 1.0)
            balanced.append(block * scale[:, None])
        return torch.cat(balanced, dim=1)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        self.step += 1
        if self.first_moments is None or self.first_moments.shape != grads.shape:
            self.first_moments = torch.zeros_like(grads)
            self.second_moments = torch.zeros_like(grads)
        balanced = self._balance(grads)
        beta1, beta2, _ = self.betas
        self.first_moments = beta1 * self.first_moments + (1 - beta1) * balanced  # m_k
        self.second_moments = beta2 * self.second_moments + (1 - beta2) * balanced**2  # v_k
        denominators = (self.second_moments / (1 - beta2**self.step)).sqrt() + self.eps
        largest = denominators.max(dim=0).values  # max over losses
        update = (self.first_moments / (1 - beta1**self.step)).sum(dim=0) / largest
        return Aggregation(update=update, weights=None)
