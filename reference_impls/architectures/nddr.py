"""NDDR-CNN: fuse the tasks' features by a learned, per-task dimensionality reduction.

Gao, Ma, Zhao, Liu, Yuille, "NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by
Neural Discriminative Dimensionality Reduction", CVPR 2019 (arXiv:1801.08297).
After block j every task column's features (C channels each) are concatenated along the
channel axis (K*C channels, Eq. (1)), and each task k reduces them back to C channels with
its own 1x1 convolution W_k (Eq. (2)), followed by batch normalisation and a ReLU:

    F_k <- ReLU(BN(W_k [F_1, ..., F_K]))         (the NDDR layer, Sec. 3; Eqs. (1)-(2))

W_k is initialised "diagonally": alpha * I on task k's own block and beta * I on the
others (Eq. (3), Sec. 4.1; default (0.9, 0.1)). With (1, 0) and no BN the layer passes each
task's own features through, so the model equals K separate networks (tested; column
outputs are already ReLU'd, so the extra ReLU is the identity). With BN the convolution has
no bias: the batch mean would subtract it again.

Equation numbers are those of the CVPR camera-ready copy on the first author's site
(ethanygao/ethanygao.github.io, pdf/CVPR2019 - NDDR-CNN.pdf); it numbers three equations,
and where the ReLU goes is given by Fig. 1 and the text.

Left out: the VGG/ResNet backbones, pretrained single-task columns, and the paper's
larger learning rate for the NDDR layers. The 1x1 convolution is a ChannelLinear, so the
same layer works for vector encoders (where it is an ordinary linear layer).

Compared with the authors' TensorFlow release, github.com/ethanygao/NDDR-CNN
(nets/nddr_layer.py, nets/vgg_deeplab_nddr.py, nets/model_arg_scopes.py,
train_multiple_tasks.py): there the layer is a slim 1x1 conv that, under the training
arg scope, gets batch norm (no bias) and a ReLU, as here. Differences: the release is
written for two tasks, and giving every other task's block beta * I is our extension to K
tasks; its "shortcut" VGG variant (one more 1x1 layer fusing the resized outputs of all
NDDR layers of the task before its head), its Xavier-initialisation option and weight decay
(on every conv weight there, NDDR's included) are not here (decay is left to the optimiser);
its batch norm uses
TF-slim settings (decay 0.95, eps 1e-3) where this one keeps PyTorch's defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for


class NDDRLayer(nn.Module):
    """One task's reduction: K*C channels -> C channels, then BN (optional) and ReLU."""

    def __init__(self, num_tasks: int, task_index: int, channels: int,
                 init: tuple[float, float], batch_norm: bool):
        super().__init__()
        # with batch norm after it, a bias would be subtracted again with the batch mean
        self.reduce = ChannelLinear(num_tasks * channels, channels, bias=not batch_norm)
        own, other = init
        blocks = [torch.eye(channels) * (own if k == task_index else other) for k in range(num_tasks)]
        with torch.no_grad():
            self.reduce.weight.copy_(torch.cat(blocks, dim=1))
            if self.reduce.bias is not None:
                self.reduce.bias.zero_()
        self.norm = nn.BatchNorm1d(channels) if batch_norm else None

    def forward(self, concatenated: Tensor) -> Tensor:
        y = self.reduce(concatenated)
        if self.norm is not None:  # BatchNorm1d over (B, C, L) also covers (B, C, H, W)
            y = self.norm(y.flatten(2) if y.ndim > 2 else y).view_as(y)
        return torch.relu(y)


class NDDR(MultiTaskModel):
    """Task columns from ``make_column()`` with an NDDR layer per task after every block."""

    name = "nddr"
    equations_checked_in = "ethanygao/ethanygao.github.io, pdf/CVPR2019 - NDDR-CNN.pdf"

    def __init__(
        self,
        tasks: Sequence[str],
        make_column: Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        init: tuple[float, float] = (0.9, 0.1),
        batch_norm: bool = True,
    ):
        super().__init__(tasks)
        self.columns = nn.ModuleDict({t: make_column() for t in self.tasks})
        widths = self.columns[self.tasks[0]].widths[1:]
        self.num_blocks = len(widths)
        self.fusions = nn.ModuleList(
            nn.ModuleDict({t: NDDRLayer(len(self.tasks), k, c, init, batch_norm)
                           for k, t in enumerate(self.tasks)})
            for c in widths
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kw) -> "NDDR":
        heads = heads_for(problem, width)
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth), heads, **kw)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [x] * len(self.tasks)
        for j in range(self.num_blocks):
            features = [self.columns[t].blocks[j](f) for t, f in zip(self.tasks, features)]
            concatenated = torch.cat(features, dim=1)  # [F_1, ..., F_K] on the channel axis
            features = [self.fusions[j][t](concatenated) for t in self.tasks]
        return {t: self.heads[t](f) for t, f in zip(self.tasks, features)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # The fusion of task k feeds column k, which feeds every task at the next
        # NDDR layer; only the last fusion and the head are task k's alone.
        yield from self.fusions[-1][task].parameters()
        yield from self.heads[task].parameters()
