"""Piggyback: one frozen backbone, a learned binary mask over its weights per task.

Mallya, Davis & Lazebnik, "Piggyback: Adapting a Single Network to Multiple Tasks by
Learning to Mask Weights", ECCV 2018, arXiv:1801.06519.

The backbone's weights ``W`` are never trained. Each task owns a real-valued score
tensor ``m^r`` of the same shape as every weight tensor; a hard threshold turns it into
a binary mask, and the task runs the backbone with the masked weights (paper's Fig. 1
and method section; a fully connected layer shown, convolutions alike):

    m_ji = 1 if m^r_ji > tau else 0                    (binarise the scores)
    y    = (W ⊙ m) x                                   (masked layer)
    dL/dm_ji = dL/dy_j · w_ji · x_i,  i.e.  dL/dm = (dL/dy x^T) ⊙ W
    dL/dm^r := dL/dm                                   (straight-through estimator)

The threshold has no useful derivative, so the backward pass copies the gradient of
the binary mask onto the scores unchanged: a score below the threshold still learns and
can switch its weight back on. Scores start above the threshold (1e-2 vs tau = 5e-3,
the official code's defaults), so the untrained model *is* the backbone (tested). After
training only the binary masks are kept: one bit per backbone weight per task, and
since no task can change ``W`` or another task's mask, tasks never interfere.

The backbone is any stack of ``nn.Linear`` / ``nn.Conv2d`` layers each followed by a
ReLU (what ``trunk_for`` builds); its weights and biases are copied into buffers, so
optimisers cannot see them and :meth:`shared_parameters` is empty. Only the weights are
masked: each bias is added unmasked (tested).

Left out: the ImageNet-pretrained VGG/ResNet/DenseNet backbones (the backbone here is a
random frozen initialisation), the paper's task-specific batch-norm variant and
ternary masks; ``>`` (not ``>=``) follows the official code's binariser.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .encoders import backbone_layers, conv_geometry, run_layer
from .task_adapted import TaskAdaptedBackbone


class ThresholdSTE(torch.autograd.Function):
    """Forward: ``1[scores > threshold]``. Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None  # dL/dm^r := dL/dm


class MaskedLayer(nn.Module):
    """A frozen linear or convolution layer with one real-valued score tensor per task."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, tasks: Sequence[str], threshold: float, init_score: float):
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.geometry = conv_geometry(layer)
        self.scores = nn.ParameterDict({t: nn.Parameter(torch.full_like(self.weight, init_score)) for t in tasks})
        self.threshold = threshold

    def mask(self, task: str) -> Tensor:
        return ThresholdSTE.apply(self.scores[task], self.threshold)

    def masked_weight(self, task: str) -> Tensor:
        return self.weight * self.mask(task)  # W ⊙ m

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters only ``task`` reads."""
        yield self.scores[task]

    def forward(self, x: Tensor, task: str) -> Tensor:
        w = self.masked_weight(task)
        return run_layer(self.geometry, x, w, self.bias)


class Piggyback(TaskAdaptedBackbone):
    """A frozen backbone masked per task, then one trainable head per task."""

    name = "piggyback"

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        threshold: float = 5e-3,
        init_score: float = 1e-2,
    ):
        layers = backbone_layers(backbone, purpose="mask")
        super().__init__(tasks, (MaskedLayer(m, tasks, threshold, init_score) for m in layers), heads)
