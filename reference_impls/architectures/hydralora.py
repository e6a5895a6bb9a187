"""HydraLoRA: one shared down-projection A, several up-projections B_i mixed by a router.

Tian, Shi, Guo, Li, Xu, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient
Fine-Tuning", NeurIPS 2024, arXiv:2404.19245.

LoRA adds a rank-r update B A to a frozen weight W0. HydraLoRA observes that, when one
adapter is trained on heterogeneous data, the A matrices of separately trained adapters
end up alike while the B matrices stay distinct. It therefore keeps a single A for all
data and N "heads" B_1..B_N (the asymmetric structure of its Fig. 1c), and lets a small
router decide, per token, how much each head contributes (Sec. 3):

    W = W0 + ΔW = W0 + sum_i ω_i B_i A                 (Eq. 2, the asymmetric update)
    ω = softmax(W_g^T x)                               (Eq. 4, the MoE router)
    y = W0 x + sum_i ω_i(x) B_i A x                    (Eq. 3, the forward pass)

As in LoRA, the update is scaled by α / r; the default α = r gives Eq. 3 unscaled (tested).
The router is a bias-free linear map of the layer input (as in the official code); its
outputs are a probability distribution over the N heads (tested). All B_i start at zero,
so the untrained model is the backbone (tested); for any fixed ω the update is one
rank-≤r matrix Σ ω_i B_i A that folds into W0 (tested). Nothing in HydraLoRA is keyed on
a task label: the heads specialise on latent sub-domains found by the router. As a
multi-task model it is therefore a frozen backbone whose adapters (A, the B heads and the
routers) are shared by all tasks, with one output head per task; only the heads are
task-specific.

Convolutions are adapted as in :mod:`.lora`: A is a k x k convolution down to r channels,
each B_i a 1x1 convolution back up, and the router a convolution with the layer's kernel,
so ω is computed per output pixel from the patch the layer reads (the analogue of per token).

Left out: the pretrained LLaMA-2 weights (the backbone is a random frozen initialisation),
the k-means analysis that picks N, dropout on the adapter path, and the load-balancing loss
of the official multimodal variant (its language-model code computes none: its balancing
term is a constant zero; Clin0212/HydraLoRA). Its run script scales the adapter by 8 and uses
4 B heads (here scale 1 and 3). Equation numbers are those of arXiv:2404.19245v2
(Sec. 3; Eq. 1 there is plain LoRA, y = W0 x + B A x).

Equation numbers checked in a PDF-to-Markdown conversion of arXiv:2404.19245v2, found in the public
GitHub index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .encoders import backbone_layers
from .lora import low_rank_pair
from .task_adapted import SharedAdaptedBackbone


def router_for(layer: nn.Linear | nn.Conv2d, num_heads: int) -> nn.Module:
    """Bias-free linear map of the layer input to N logits (a k x k convolution for maps)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_heads, bias=False)
    # Same stride and padding geometry as the layer, so ω has the output's spatial size.
    return nn.Conv2d(layer.in_channels, num_heads, layer.kernel_size, layer.stride, layer.padding, bias=False)


class HydraAdapted(nn.Module):
    """A frozen layer W0 plus Σ_i ω_i(x) B_i A x with one shared A and N routed heads B_i."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, num_heads: int, alpha: float):
        super().__init__()
        self.base = layer
        self.down, first_up = low_rank_pair(layer, rank)  # A (Gaussian), B_1 (zero)
        self.up = nn.ModuleList([first_up] + [low_rank_pair(layer, rank)[1] for _ in range(num_heads - 1)])
        self.router = router_for(layer, num_heads)
        self.scale = alpha / rank

    def route(self, x: Tensor) -> Tensor:
        """ω: softmax over the N heads, shape (B, N) or (B, N, H, W)."""
        return torch.softmax(self.router(x), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.down(x)  # A x, shared by every head
        heads = torch.stack([b(z) for b in self.up], dim=1)  # (B, N, d_out, ...)
        weights = self.route(x).unsqueeze(2)  # (B, N, 1, ...)
        return self.base(x) + self.scale * (weights * heads).sum(dim=1)

    def delta_weight(self, weights: Tensor) -> Tensor:
        """(α / r) Σ_i ω_i B_i A for one routing vector ω (N,), shaped like W0."""
        a = self.down.weight.flatten(1)  # r x d_in
        b = torch.stack([up.weight.flatten(1) for up in self.up])  # N x d_out x r
        mixed = torch.einsum("n,nor->or", weights, b)
        return (self.scale * mixed @ a).view_as(self.base.weight)


class HydraLoRA(SharedAdaptedBackbone):
    """A frozen backbone whose every layer carries a shared HydraLoRA adapter, then task heads."""

    name = "hydralora"
    equations_checked_in = "a PDF-to-Markdown conversion of arXiv:2404.19245v2"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        rank: int = 4,
        num_heads: int = 3,
        alpha: float | None = None,
        freeze_backbone: bool = True,
    ):
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        alpha = float(rank) if alpha is None else alpha
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (HydraAdapted(m, rank, num_heads, alpha) for m in layers), heads)
