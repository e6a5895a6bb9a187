"""Rep-MTL: regularising the task saliencies on the shared representation.

Wang, Li, Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for
Multi-Task Learning", ICCV 2025, arXiv:2507.21049. Equation numbers are those of arXiv:2507.21049v1
(28 Jul 2025), a Markdown transcript of arXiv:2507.21049 in the public GitHub index (file id
61083925181); all cited numbers (Eqs. 3-10) match it.

Instead of re-weighting losses or editing gradients, Rep-MTL adds two penalties computed
from each task's saliency S_t = ∂L_t/∂Z, the gradient of its loss with respect to the
shared representation Z (B x C x H' x W', Eq. 3), and keeps equal loss weights:

* task-specific saliency regulation (Sec. 3.2): average S_t over channels, Ŝ_t (Eq. 4;
  as printed, Eq. 4 averages the signed S_t and the absolute value first appears in Eq. 5,
  so we take it after averaging, not on S_t before), normalise across tasks at
  every sample and position, P_t = |Ŝ_t| / Σ_k |Ŝ_k| (Eq. 5), and
  penalise the mean entropy of that task distribution, L_tsr = mean(−Σ_t P_t log P_t)
  (Eq. 6), so that positions stay salient for few tasks;
* cross-task saliency alignment (Sec. 3.3): per task and sample the channel affinity
  M_t = S_t S_tᵀ (C x C, Eq. 7); per sample an anchor from the spatially averaged
  saliencies of all tasks, A_b (C x T), Â_b = A_b A_bᵀ (Eq. 8); after L2 normalisation a
  contrastive loss with the anchor and each task's affinity of the same sample as positive
  pair and the anchors of the other samples as negatives, at temperature τ (Eq. 9).

Total objective (Eq. 10): Σ_t L_t + λ_tsr L_tsr + λ_csa L_csa. The saliencies are taken
with ``create_graph=True`` so both penalties train the network.

Our reading of Eq. 8-9, where the extracted text is terse: A_b stacks the T tasks'
spatially averaged saliencies as columns; Eq. 9 is averaged over samples b and tasks t
(the printed Eq. 9 averages over b only and leaves the task t of z_bt free; the mean over t
is ours), and its denominator sums over the other samples k ≠ b only, as printed. The default
λ_tsr, λ_csa and τ are our choices, not checked against the paper. The negatives compare the
anchor Â_b with the other anchors Â_k; comparing each task's M_t of sample b with Â_k would
be another reading. No code could be compared: the authors' repository Jacky1128/Rep-MTL holds
only a README (code announced, not released, at commit ecef712), so this module follows the paper alone.

Interface: a ``LossWeighting`` with weights all 1 (the paper's "Rep-MTL (EW)");
``combine(losses, representation=Z)`` returns Eq. 10. Z is B x C (vectors: H'W' = 1) or
B x C x H x W. Left out: the paper's dense-prediction backbones and benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class RepMTL(LossWeighting):
    """Equal weights plus the saliency entropy (Eq. 6) and alignment (Eq. 9) penalties."""

    name = "rep_mtl"
    training_hook = "combine"  # must be called with representation=Z, the shared features

    def __init__(self, tsr_weight: float = 0.1, csa_weight: float = 0.1, temperature: float = 0.5,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"Rep-MTL's contrastive temperature must be > 0, got {temperature}")
        self.tsr_weight, self.csa_weight = tsr_weight, csa_weight
        self.temperature, self.eps = temperature, eps

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return torch.ones_like(losses.detach())

    def combine(self, losses: Tensor, step: int = 0, epoch: int = 0,
                representation: Tensor | None = None) -> Tensor:
        if representation is None:
            raise ValueError("Rep-MTL needs the shared representation Z: combine(losses, representation=Z)")
        saliency = task_saliencies(losses, representation)
        return (losses.sum() + self.tsr_weight * saliency_entropy(saliency, self.eps)
                + self.csa_weight * saliency_alignment(saliency, self.temperature, self.eps))


def task_saliencies(losses: Tensor, representation: Tensor) -> Tensor:
    """S_t = ∂L_t/∂Z for every task (Eq. 3), differentiable; shape T x B x C x (H'W')."""
    rows = [torch.autograd.grad(loss, representation, retain_graph=True, create_graph=True)[0]
            for loss in losses]
    return torch.stack(rows).flatten(3) if representation.ndim > 2 else torch.stack(rows)[..., None]


def saliency_entropy(saliency: Tensor, eps: float = 1e-12) -> Tensor:
    """Eq. 4-6: mean over samples and positions of the entropy of the task distribution."""
    spatial = saliency.mean(dim=2).abs()                       # |Ŝ_t|: T x B x H'W'
    probs = spatial / spatial.sum(dim=0, keepdim=True).clamp_min(eps)
    return -(probs * torch.log(probs.clamp_min(eps))).sum(dim=0).mean()


def saliency_alignment(saliency: Tensor, temperature: float = 0.5, eps: float = 1e-12) -> Tensor:
    """Eq. 7-9: contrastive alignment of each task's channel affinity with the sample anchor."""
    t, b = saliency.shape[:2]
    if b < 2:
        return saliency.sum() * 0  # no negatives in a batch of one
    affinity = saliency @ saliency.transpose(-1, -2)            # M_t: T x B x C x C
    anchors = saliency.mean(dim=3).permute(1, 2, 0)             # A_b: B x C x T
    anchor_affinity = anchors @ anchors.transpose(-1, -2)       # Â_b: B x C x C
    z_task = torch.nn.functional.normalize(affinity.flatten(2), dim=-1, eps=eps)       # T x B x C²
    z_anchor = torch.nn.functional.normalize(anchor_affinity.flatten(1), dim=-1, eps=eps)  # B x C²
    positive = (z_anchor[None] * z_task).sum(-1) / temperature  # T x B
    between = z_anchor @ z_anchor.T / temperature               # B x B
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=between.device)
    negatives = torch.logsumexp(between.masked_fill(~off_diagonal, float("-inf")), dim=1)  # B
    return (negatives[None] - positive).mean()
