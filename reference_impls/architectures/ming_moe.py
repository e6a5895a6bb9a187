"""MING-MOE: a frozen model whose layers carry a sparse, token-routed mixture of LoRA experts.

Liao, Jiang, Wang, Wang, "MING-MOE: Enhancing Medical Multi-Task Learning in Large Language
Models with Sparse Mixture of Low-Rank Adapter Experts", arXiv 2024, arXiv:2404.09027.

Task-gated LoRA mixtures need the task's identity at inference time, which real users do not
supply. MING-MOE drops the task label altogether: every adapted linear layer W0 of the frozen
base model gets E LoRA experts (B_e A_e, each of rank r) and a router, and the router picks, for
every token separately, the k experts with the highest softmax score and renormalises them:

    p(x)    = softmax(W_g x + b_g)                      (one score per expert, per token)
    T(x)    = indices of the k largest entries of p(x)
    g_e(x)  = p_e(x) / sum_{j in T(x)} p_j(x)  for e in T(x), else 0
    y       = W0 x + (α / r) sum_{e in T(x)} g_e(x) B_e A_e x

So each token uses exactly k of the E experts (tested), with weights that sum to one; the
others neither contribute nor receive a gradient for that token (tested). As in the official
code (``MoLoRALinear``) A_e starts random and B_e at zero, so the untrained model is the base
model (tested), and the router is a linear map with a bias. With k = E the layer becomes a
dense softmax mixture of LoRA experts (tested); with k = 1 the renormalised gate is always 1,
so the router gets no gradient (up to rounding; tested), hence k = 2 by default. An optional
load-balancing term of the Switch-Transformer form, E sum_e f_e P_e (f_e the fraction of routing
slots given to expert e, P_e its mean router probability), is returned by
:meth:`MINGMoE.auxiliary_loss` scaled by ``balance_weight`` (default 0, opt in with e.g.
``--arch-kw balance_weight=0.01``). The official code's own balance term differs: it sits in its
evaluation-time routine only, counts f_e per token (summing to k), takes P_e as the mean
renormalised gate of the tokens sent to e, and scales by E / k^2.

As a multi-task model nothing but the output heads is task-specific: the adapters are shared
and specialise through routing. Convolutions are adapted as in :mod:`.lora` and routed per
output pixel (the analogue of a token) by a router convolution with the layer's kernel, as in
:mod:`.hydralora`. The equations are not cited by number: the paper text was not available to
check them; the rule above follows the official MING repository.

Left out: the pretrained Qwen base model (here a random frozen trunk stands in), the
restriction to the feed-forward projections of a transformer (here every layer of the small
trunk is adapted), the optional always-on shared expert, expert sampling instead of top-k,
LoRA dropout (never applied in the official training path either), and the bilingual medical
instruction data. A_e is drawn Gaussian as in :mod:`.lora` (the official code uses
Kaiming-uniform). Every official mixture-of-LoRA run also gives the attention projections a
plain single LoRA adapter, with scale 16 / 32 = 0.5 (1 here), and its balance term is computed
only in an evaluation routine, never added to a loss (MediaBrain-SJTU/MING).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .encoders import backbone_layers
from .lora import low_rank_pair
from .mod_squad import top_k_gates
from .task_adapted import SharedAdaptedBackbone


def switch_for(layer: nn.Linear | nn.Conv2d, num_experts: int) -> nn.Module:
    """The router: a linear map (with bias) of the layer input to E logits; a convolution for maps."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_experts)
    return nn.Conv2d(layer.in_channels, num_experts, layer.kernel_size, layer.stride, layer.padding)


class MoLoRALayer(nn.Module):
    """A frozen layer W0 plus a top-k mixture of E rank-r LoRA experts chosen per token."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, num_experts: int, k: int, alpha: float):
        super().__init__()
        require_positive(rank=rank)
        if not 1 <= k <= num_experts:
            raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
        self.base, self.k, self.scale = layer, k, alpha / rank
        pairs = [low_rank_pair(layer, rank) for _ in range(num_experts)]
        self.down = nn.ModuleList(a for a, _ in pairs)  # A_e
        self.up = nn.ModuleList(b for _, b in pairs)  # B_e (zero at the start)
        self.switch = switch_for(layer, num_experts)
        self.last_probs: Tensor | None = None  # p(x) of the last call, for the balance term
        self.last_gates: Tensor | None = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router probabilities p(x) and sparse gates g(x), both (B, E) or (B, E, H, W)."""
        probs = torch.softmax(self.switch(x), dim=1)
        gates = top_k_gates(probs.movedim(1, -1), self.k).movedim(-1, 1)
        return probs, gates

    def forward(self, x: Tensor) -> Tensor:
        probs, gates = self.route(x)
        self.last_probs, self.last_gates = probs, gates
        # all experts are evaluated densely for brevity; only k gates per token are non-zero
        experts = torch.stack([b(a(x)) for a, b in zip(self.down, self.up)], dim=1)  # (B, E, d_out, ...)
        return self.base(x) + self.scale * (gates.unsqueeze(2) * experts).sum(1)

    def balance_loss(self) -> Tensor:
        """E sum_e f_e P_e over the tokens (and pixels) of the last call."""
        if self.last_probs is None or self.last_gates is None:
            raise RuntimeError("balance_loss() needs a forward pass first")
        num_experts = self.last_probs.shape[1]
        probs = self.last_probs.movedim(1, -1).reshape(-1, num_experts)
        chosen = (self.last_gates.movedim(1, -1).reshape(-1, num_experts) > 0).to(probs)
        fraction = chosen.sum(0) / chosen.sum()  # share of the k * tokens routing slots
        return num_experts * (fraction * probs.mean(0)).sum()

    def __getstate__(self) -> dict:
        # the cached routing belongs to one forward pass (and its graph): copies start without it
        return {**super().__getstate__(), "last_probs": None, "last_gates": None}


class MINGMoE(SharedAdaptedBackbone):
    """A frozen backbone whose every layer carries a shared MoLoRA adapter, then task heads."""

    name = "ming_moe"

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module],
                 rank: int = 4, num_experts: int = 4, k: int = 2, alpha: float | None = None,
                 balance_weight: float = 0.0, freeze_backbone: bool = True):
        alpha = float(rank) if alpha is None else alpha
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (MoLoRALayer(m, rank, num_experts, k, alpha) for m in layers), heads)
        self.balance_weight = balance_weight

    def auxiliary_loss(self) -> Tensor:
        """``balance_weight`` x the mean load-balancing term of the last forward pass."""
        return self.balance_weight * torch.stack([layer.balance_loss() for layer in self.layers]).mean()
