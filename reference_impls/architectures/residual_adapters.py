"""Residual adapters: a shared network steered to each task by 1x1 filters on a skip path.

Rebuffi, Bilen, Vedaldi, "Learning multiple visual domains with residual adapters",
NeurIPS 2017, arXiv:1705.08045.

The filters w of a network trained once are shared by every task (domain). After each
shared convolution, a task inserts its own adapter module: a bank of 1x1 filters α_t
whose output is added to its input (Sec. 3.2, Fig. 2; the formula is not numbered there),

    g(x; α_t) = x + α_t * x

so α_t only has to learn how the task *differs* from the shared features, and α_t = 0
leaves them untouched. The batch-norm layers around the adapter belong to the task as
well (Fig. 2); as in the official code's "series adapters", a task computes after
every shared convolution y = w * x

    y_t = BN''_t( y + α_t * BN'_t(y) )

which is C^2 + 4C parameters per layer of C channels (α_t and two scale/shift pairs),
against 9 C_in C for the shared 3x3 filters (tested). The paper counts 2(C^2 + 5C) per
residual module of two adapters, i.e. C^2 + 5C per adapter, because its 1x1 bank has a
bias; ours has none (the following norm's shift makes it redundant). With α_t = 0 a task
runs the shared network through its own batch norm; untrained norms make that the shared
network itself (tested). The shared filters are frozen by default, as when the paper adds domains to a
network trained on ImageNet (``freeze_backbone=False`` trains them jointly).

For vectors the shared layers are linear, α_t is a C x C matrix and the norms are
``BatchNorm1d``.

Left out: the ResNet-26 backbone and its ImageNet pretraining (the backbone here is the
small plain conv/MLP stack of ``trunk_for``, randomly initialised, so the adapters sit
after plain layers rather than inside residual units), the adapters' own weight decay
and dropout, and the Visual Decathlon data with its score S (Eq. 1, the paper's only numbered
equation). The adapter formulas above are unnumbered in Sec. 3.2, so they are cited by section
and figure. This was checked in the NIPS 2017 copy on the second author's site (Rebuffi17.pdf of
hbilen.github.io, assets/pdf/Rebuffi17.pdf, read in the copy 9160476108/hbilen.github.io,
commit d219cd2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from .encoders import ChannelLinear, backbone_layers
from .task_adapted import TaskAdaptedBackbone


class AdaptedLayer(nn.Module):
    """A shared linear/conv layer followed by one residual adapter and two norms per task."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, tasks: Sequence[str]):
        super().__init__()
        self.shared = layer
        width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        norm = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
        self.alpha = nn.ModuleDict({t: ChannelLinear(width, width, bias=False) for t in tasks})  # 1x1 filters
        self.norm_in = nn.ModuleDict({t: norm(width) for t in tasks})  # BN'_t
        self.norm_out = nn.ModuleDict({t: norm(width) for t in tasks})  # BN''_t

    def adapter(self, y: Tensor, task: str) -> Tensor:
        """g(y; α_t) = y + α_t * BN'_t(y): the residual adapter module."""
        return y + self.alpha[task](self.norm_in[task](y))

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` reads."""
        yield from self.alpha[task].parameters()
        yield from self.norm_in[task].parameters()
        yield from self.norm_out[task].parameters()

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.norm_out[task](self.adapter(self.shared(x), task))


class ResidualAdapters(TaskAdaptedBackbone):
    """Shared (frozen) layers, a residual adapter after each one per task, then task heads."""

    name = "residual_adapters"
    equations_checked_in = "Rebuffi17.pdf of hbilen.github.io"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        freeze_backbone: bool = True,
    ):
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (AdaptedLayer(m, tasks) for m in layers), heads)
