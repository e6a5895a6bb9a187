"""Parallel residual adapters: a task's 1x1 filters run beside each shared convolution.

Rebuffi, Bilen, Vedaldi, "Efficient Parametrization of Multi-Domain Deep Neural
Networks", CVPR 2018, arXiv:1803.10082.

The follow-up to :mod:`.residual_adapters` keeps one set of shared filters w for every
task (domain) and compares two places for a task's small bank of 1x1 filters α_t. The
*series* adapter of the earlier paper transforms the output of the shared convolution;
the *parallel* adapter, implemented here, reads the same input x as the shared 3x3
convolution and adds its own response to it, after which the task's batch norm follows
(as in the official code's ``parallel_adapters`` mode):

    y_t = BN_t( w * x + α_t * x )

The paper's Section 3.1.2 writes the adapter without the norm, unnumbered, as

    y = f * x + diag_1(α) * x = (f + diag_L(α)) * x.

Because a 1x1 filter is a 3x3 filter that is zero outside its centre, the two branches
are one convolution with the task's kernel w + pad(α_t): a task can be run at the cost
of the shared network alone (:meth:`ParallelAdaptedLayer.merged_kernel`, tested). A
parallel adapter maps C_in to C_out channels, so it costs
C_in C_out + 2 C_out parameters per layer with its batch norm (tested), and α_t = 0
leaves the shared network followed by the task's batch norm (tested).

For vectors the shared layers are linear, α_t is a C_out x C_in matrix, the merged
weight is w + α_t and the norms are ``BatchNorm1d``. The shared filters are frozen by
default, as when a network pretrained on ImageNet is extended to new domains
(``freeze_backbone=False`` trains them jointly). The adapters are drawn like the shared
filters (PyTorch's default initialisation).

Left out: the ResNet-26 backbone and its ImageNet pretraining (here the small plain
conv/MLP stack of ``trunk_for``, random and frozen), the joint low-rank compression of
the adapters across domains (α_t ≈ β γ_t^T with β shared, Eq. 1 of Section 3.4) and the
per-layer allocation study, dropout on the adapter input, and the Visual Decathlon data.

Equation numbers are those of the authors' CVPR 2018 copy (9 pages, PDF dated 2018-03-29) on
the second author's site, Rebuffi18.pdf of hbilen.github.io (assets/pdf/, read in the copy
9160476108/hbilen.github.io, commit d219cd2). That text numbers only Eq. 1; the adapter formulas of Section 3.1 carry
no number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import backbone_layers, conv_geometry, run_layer
from .task_adapted import TaskAdaptedBackbone


def parallel_filters(layer: nn.Linear | nn.Conv2d) -> nn.Linear | nn.Conv2d:
    """α_t for ``layer``: 1x1 filters from its input to its output channels, same stride."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=False)
    if layer.groups != 1 or layer.dilation != (1, 1):
        raise ValueError("parallel adapters need an ordinary (ungrouped, undilated) convolution")
    kh, kw = layer.kernel_size
    if kh % 2 == 0 or kw % 2 == 0 or layer.padding != (kh // 2, kw // 2):
        raise ValueError(f"a parallel adapter's 1x1 output is added to the layer's, so the layer needs an odd "
                         f"kernel with 'same' padding; got kernel {layer.kernel_size}, padding {layer.padding}")
    return nn.Conv2d(layer.in_channels, layer.out_channels, 1, stride=layer.stride, bias=False)


class ParallelAdaptedLayer(nn.Module):
    """A shared linear/conv layer w plus, per task, parallel 1x1 filters α_t and a norm BN_t."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, tasks: Sequence[str]):
        super().__init__()
        self.shared = layer
        conv = isinstance(layer, nn.Conv2d)
        width = layer.out_channels if conv else layer.out_features
        norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
        self.alpha = nn.ModuleDict({t: parallel_filters(layer) for t in tasks})
        self.norm = nn.ModuleDict({t: norm(width) for t in tasks})

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` reads."""
        yield from self.alpha[task].parameters()
        yield from self.norm[task].parameters()

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.norm[task](self.shared(x) + self.alpha[task](x))  # BN_t(w * x + α_t * x)

    def merged_kernel(self, task: str) -> Tensor:
        """w + α_t as one weight: α_t's 1x1 filters placed at the centre of w's kernel."""
        alpha = self.alpha[task].weight
        if isinstance(self.shared, nn.Linear):
            return self.shared.weight + alpha
        kh, kw = self.shared.kernel_size  # odd, with 'same' padding (parallel_filters checks)
        return self.shared.weight + F.pad(alpha, (kw // 2, kw // 2, kh // 2, kh // 2))

    def merged_forward(self, x: Tensor, task: str) -> Tensor:
        """The task's layer as a single convolution (or linear map) with the merged kernel."""
        return self.norm[task](run_layer(conv_geometry(self.shared), x, self.merged_kernel(task), self.shared.bias))


class ParallelResidualAdapters(TaskAdaptedBackbone):
    """Shared (frozen) layers, each with a parallel 1x1 adapter and a norm per task, then heads."""

    name = "parallel_residual_adapters"
    equations_checked_in = "Rebuffi18.pdf of hbilen.github.io"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        freeze_backbone: bool = True,
    ):
        layers = backbone_layers(backbone, freeze_backbone)
        super().__init__(tasks, (ParallelAdaptedLayer(m, tasks) for m in layers), heads)
