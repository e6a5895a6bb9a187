"""UberNet: an image pyramid through one shared trunk, task heads fed from every depth.

Kokkinos, "UberNet: Training a 'Universal' Convolutional Neural Network for Low-, Mid-,
and High-Level Vision using Diverse Datasets and Limited Memory", CVPR 2017,
arXiv:1609.02132.

One VGG-style trunk serves seven vision tasks, from boundaries to detection. What this
file keeps:

1. **Image pyramid.** The image is resized to several scales and every scale goes
   through the *same* trunk (shared weights).
2. **Skip layers at every depth.** Each task reads the trunk's features at several
   depths (low-level tasks need early layers, semantic ones late layers) through its
   own 1x1 *skip layer* per depth.
3. **Fusion.** For each task the skip-layer responses of one scale are concatenated
   and fused by a linear (1x1) layer into a per-scale prediction; the per-scale
   predictions, brought to the input resolution, are concatenated and fused by
   another linear layer into the final prediction. Here skip and layer-fusion
   weights are the same at every scale (whether the paper ties them across scales is
   not verified).
4. **Training on datasets with missing labels.** No dataset labels every task, so
   the loss of an image contains only the tasks it has ground truth for:

       L = sum_t  sum_i  delta_{t,i} * l_t(f_t(x_i), y_{t,i})

   with ``delta_{t,i} = 1`` when image ``i`` is labelled for task ``t`` and 0 otherwise
   (:func:`missing_label_loss`); no label is imputed. Here each task's sum is divided
   by its number of labelled images in the batch; the paper instead accumulates each
   task's gradients until that task has seen its own effective batch size, which this
   per-task averaging approximates within one batch.

The pyramid features are upsampled to the input resolution before the skip layers
(a 1x1 convolution commutes with bilinear upsampling), so :meth:`encode` returns one
shared representation: all scales and depths stacked along channels. For a problem with
one output per image (not dense), each task's fused prediction is averaged over pixels.

Equation numbers of the paper were not verified here, so none are quoted. Left out:
the VGG-16 trunk, batch normalisation of the skip layers, the asynchronous per-task
updates and the low-memory backpropagation (recomputing activations instead of storing
them), and the detection branch (region proposals, Fast R-CNN head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import ConvEncoder
from .registry import Problem


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UberNetHead(nn.Module):
    """One task: a 1x1 skip layer per depth, fusion over depths, then fusion over scales."""

    def __init__(self, channels: int, depths: int, scales: int, hidden: int, out_dim: int):
        super().__init__()
        self.skips = nn.ModuleList(nn.Conv2d(channels, hidden, 1) for _ in range(depths))
        self.layer_fusion = nn.Conv2d(depths * hidden, out_dim, 1)
        self.scale_fusion = nn.Conv2d(scales * out_dim, out_dim, 1)

    def per_scale(self, features: Sequence[Tensor]) -> Tensor:
        """Prediction of one scale from that scale's features at every depth."""
        responses = [skip(f) for skip, f in zip(self.skips, features)]
        return self.layer_fusion(torch.cat(responses, dim=1))

    def forward(self, pyramid: Sequence[Sequence[Tensor]]) -> Tensor:
        return self.scale_fusion(torch.cat([self.per_scale(feats) for feats in pyramid], dim=1))


class UberNet(MultiTaskModel):
    """Shared trunk applied to an image pyramid; per-task multi-depth skip layers and fusion."""

    name = "ubernet"

    def __init__(
        self,
        tasks: Sequence[str],
        trunk: ConvEncoder,
        out_dims: Mapping[str, int],
        scales: Sequence[float] = (1.0, 0.5),
        hidden: int = 8,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(hidden=hidden)
        if trunk.downsample != 1 or len(set(trunk.widths[1:])) != 1:
            raise ValueError("UberNet here needs a resolution-keeping trunk with equal widths")
        self.trunk = trunk
        self.scales = tuple(scales)
        self.dense = dense
        self.channels = trunk.out_channels
        self.depths = len(trunk.blocks)
        self.heads = nn.ModuleDict({
            t: UberNetHead(self.channels, self.depths, len(self.scales), hidden, out_dims[t])
            for t in self.tasks
        })

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> UberNet:
        if not problem.is_image:
            raise ValueError("UberNet runs an image pyramid through a conv trunk; it needs an image problem")
        trunk = ConvEncoder(problem.input_shape[0], (width,) * 3)
        return cls(problem.tasks, trunk, problem.task_out_dims, dense=problem.dense, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        """Every (scale, depth) feature map at input resolution, stacked: ``(B, S*D*C, H, W)``."""
        maps = []
        for s in self.scales:
            h = x if s == 1.0 else _resize(x, [max(1, round(n * s)) for n in x.shape[-2:]])
            for block in self.trunk.blocks:  # the same weights at every scale
                h = block(h)
                maps.append(_resize(h, x.shape[-2:]))
        return torch.cat(maps, dim=1)

    def _pyramid(self, z: Tensor) -> list[list[Tensor]]:
        chunks = z.split(self.channels, dim=1)
        return [list(chunks[k * self.depths:(k + 1) * self.depths]) for k in range(len(self.scales))]

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        pyramid = self._pyramid(z)
        out = {t: self.heads[t](pyramid) for t in self.tasks}
        return out if self.dense else {t: y.mean(dim=(2, 3)) for t, y in out.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()


def missing_label_loss(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    labelled: Mapping[str, Tensor],
    losses: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
) -> Tensor:
    """``sum_t mean over labelled i of l_t``: images without task ``t``'s label add nothing.

    ``labelled[t]`` is a ``(B,)`` boolean mask (``delta_{t,i}``); ``losses[t](pred, target)``
    returns one loss per image (``reduction='none'``, reduced over all but the batch).
    Targets of unlabelled images are never read, so they may hold anything (even NaN).
    """
    total = None
    for t, pred in outputs.items():
        mask = labelled[t].to(torch.bool)
        term = pred.new_zeros(())  # no labelled image: the task contributes exactly nothing
        if mask.any():
            term = losses[t](pred[mask], targets[t][mask]).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no task outputs")
    return total
