"""LoRA: one frozen backbone, a low-rank update of every weight matrix per task.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022, arXiv:2106.09685.

The pretrained weights W0 (d_out x d_in) stay fixed. Adapting a layer to a task means
learning a change ΔW of rank at most r, stored as the product of two thin matrices, and
adding its effect to the layer's output (Sec. 4.1):

    h = W0 x + ΔW x = W0 x + B A x          Eq. (3),  B: d_out x r,  A: r x d_in
    ΔW x is scaled by α / r                 (Sec. 4.1, text after Eq. 3; α fixed, r << min(d_in, d_out))

Only the small set Θ = {A_t, B_t} is trained, with W0 held fixed: the paper's Eq. (2) (its
Eq. (1) is the full fine-tuning objective it contrasts with), here with each task's own loss in
place of the language-model log-likelihood.

A starts Gaussian and B at zero, so ΔW = 0 and the untrained model *is* the backbone
(tested); at that point only B receives a gradient (tested). Here every task owns one
(A, B) pair per layer of one shared backbone: r (d_in + d_out) parameters per layer
instead of d_in d_out (tested). Since ΔW is a plain matrix it can be merged after
training, W_t = W0 + (α / r) B A, and the task then runs at the cost of the backbone
alone (tested).

Convolutions are treated as matrices of shape C_out x (C_in k k): A is a k x k
convolution down to r channels and B a 1x1 convolution back up, so B A is again a
rank-r matrix that folds into the kernel.

The backbone is any stack of ``nn.Linear`` / ``nn.Conv2d`` layers each followed by a
ReLU (what ``trunk_for`` builds). ``freeze_backbone=False`` trains W0 jointly as well.

Left out: the pretrained GPT-2/RoBERTa/GPT-3 weights (the backbone here is a random
frozen initialisation), the paper's choice of adapting only W_q and W_v in attention
(here every layer of the small trunk is adapted), and dropout on the LoRA path. A is
drawn with std 1/sqrt(d_in); the paper only says "random Gaussian" (the official loralib
draws A uniformly with nn.Linear's default Kaiming bound). The convolution factorisation
above is ours: loralib's Conv2d instead multiplies an (r k) x (C_in k) matrix A by a
(C_out k) x (r k) matrix B and reshapes the product to the kernel; the product has rank at
most r k, but read as the C_out x (C_in k k) matrix above its update can reach rank r k²
(capped by C_out and C_in k²), not r: 18 for r = 2, k = 3, C_in = 16, C_out = 64 with random
factors. Our default α = r (scale 1) follows the paper's advice to set α to the first r
tried; loralib's default is α = 1 (scale 1 / r), checked in microsoft/LoRA at c4593f0
(loralib/layers.py), whose forward pass, initialisation of B and merged weight ours match.

Equation numbers checked in a Markdown transcript of arXiv:2106.09685v2 (its header reads
"Version 2"), found in the public GitHub index (file id 66692134175; the index does not name the
repository). Printed Eq. (3) carries no α / r factor: the scaling is stated only
in the prose that follows it (and is missing from another transcript, index id 67229234734,
apparently arXiv v1, which numbers Eq. (3) the same), so our forward pass is Eq. (3) with
ΔW = (α / r) B A.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from ..checks import require_positive
from .encoders import backbone_layers
from .task_adapted import TaskAdaptedBackbone


def low_rank_pair(layer: nn.Linear | nn.Conv2d, rank: int) -> tuple[nn.Module, nn.Module]:
    """(A, B) for ``layer``: A maps its input to ``rank`` features, B maps them to its output."""
    require_positive(rank=rank)
    if isinstance(layer, nn.Linear):
        down = nn.Linear(layer.in_features, rank, bias=False)
        up = nn.Linear(rank, layer.out_features, bias=False)
    else:
        down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
        up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    fan_in = down.weight[0].numel()  # d_in: C_in k k for a convolution
    nn.init.normal_(down.weight, std=fan_in**-0.5)  # A: random Gaussian
    nn.init.zeros_(up.weight)  # B = 0, so ΔW = 0 at the start
    return down, up


class LowRankAdapted(nn.Module):
    """A shared linear or convolution layer W0 plus one rank-r update B_t A_t per task."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, tasks: Sequence[str], rank: int, alpha: float):
        super().__init__()
        self.base = layer
        pairs = {t: low_rank_pair(layer, rank) for t in tasks}
        self.down = nn.ModuleDict({t: a for t, (a, _) in pairs.items()})  # A_t
        self.up = nn.ModuleDict({t: b for t, (_, b) in pairs.items()})  # B_t
        self.scale = alpha / rank

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` reads."""
        yield from self.down[task].parameters()
        yield from self.up[task].parameters()

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.base(x) + self.scale * self.up[task](self.down[task](x))  # Eq. (3)

    def delta_weight(self, task: str) -> Tensor:
        """(α / r) B_t A_t, shaped like W0 (the update as one matrix, or kernel)."""
        a = self.down[task].weight.flatten(1)  # r x (C_in k k)
        b = self.up[task].weight.flatten(1)  # C_out x r
        return (self.scale * b @ a).view_as(self.base.weight)

    def merged_weight(self, task: str) -> Tensor:
        """W0 + (α / r) B_t A_t: the task's layer as a single ordinary weight."""
        return self.base.weight + self.delta_weight(task)


class LoRA(TaskAdaptedBackbone):
    """A (frozen) backbone whose layers carry one low-rank update per task, then task heads."""

    name = "lora"
    equations_checked_in = "a Markdown transcript of arXiv:2106.09685v2"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        rank: int = 4,
        alpha: float | None = None,
        freeze_backbone: bool = True,
    ):
        alpha = float(rank) if alpha is None else alpha  # α = r: the update is used unscaled
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (LowRankAdapted(m, tasks, rank, alpha) for m in layers), heads)
