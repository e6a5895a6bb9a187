"""MTI-Net: task interactions distilled separately at every scale, then aggregated.

Vandenhende, Georgoulis & Van Gool, "MTI-Net: Multi-Scale Task Interaction Networks for
Multi-Task Learning", ECCV 2020, arXiv:2001.06902.

PAD-Net distils task information once, at one scale. MTI-Net observes that tasks that
help each other at one scale need not do so at another, and distils at every scale
of a multi-scale backbone. This file keeps two scales (full and half resolution):

1. **Initial task predictions per scale.** At each scale ``s`` a task-specific block
   turns the backbone features ``B_s`` into task features ``F_t^s``, and a 1x1 layer
   predicts the task from them (deep supervision at every scale).
2. **Feature propagation module (FPM).** Coarse-scale task features are passed to the
   next, finer scale before its initial predictions: the features of all tasks are
   concatenated and fused by a shared conv block (task interaction), then each task
   picks what it needs with its own squeeze-and-excitation gate and adds it to its own
   features (a residual, as in the official FPM); the result is upsampled and
   concatenated with ``B_s`` as the input of the task's block.
3. **Multi-modal distillation per scale.** Each task's features are refined with the other
   tasks' features of *the same scale*, ``F_k + sum_{l != k} sigmoid(A_kl * F_l) ⊙ (W_kl * F_l)``:
   unlike the PAD-Net paper's single gate read from the target task (the official repository's
PAD-Net uses this same source-gated module), MTI-Net gates every message with a
   spatial mask computed from that message's own source task (one mask per target-source pair).
4. **Feature aggregation.** For each task the distilled features of all scales are
   upsampled to the finest scale, concatenated and decoded into the final prediction.

Left out: the HRNet backbone and its four scales, the paper's exact block designs
(basic residual blocks in the task heads), and the auxiliary "edge" task. Also simplified
against the official code: its FPM weights the concatenated task features by a softmax over
the tasks (computed by its shared bottleneck) and then reduces them with a residual block,
here one shared conv block fuses them; its SE gates shrink the channels 16-fold, here 4-fold
(at least one unit) because the widths are small; and its aggregation head is a 1x1 conv with
batch norm before the output layer, where the head here uses a 3x3 conv.
Checked against SimonVandenhende/Multi-Task-Learning-PyTorch: models/mti_net.py, models/layers.py,
models/padnet.py (the distillation it reuses), models/seg_hrnet.py (HighResolutionHead) and
losses/loss_schemes.py (MTINetLoss: every scale's initial predictions, upsampled, are supervised).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side
from .encoders import conv_block, conv_head
from .registry import Problem


def _upsample_to(x: Tensor, reference: Tensor) -> Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class SqueezeExcitationGate(nn.Module):
    """``x * sigmoid(W2 ReLU(W1 avgpool(x)))``: a task's channel selection in the FPM."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SourceGatedDistillation(nn.Module):
    """``F_k + sum_{l != k} sigmoid(A_kl * F_l) ⊙ (W_kl * F_l)``: each message is masked by its own source."""

    def __init__(self, target: str, sources: Sequence[str], channels: int):
        super().__init__()
        self.target = target
        others = [s for s in sources if s != target]
        self.masks = nn.ModuleDict({s: nn.Conv2d(channels, channels, 3, padding=1) for s in others})
        self.messages = nn.ModuleDict({s: nn.Conv2d(channels, channels, 3, padding=1) for s in others})

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        gated = (torch.sigmoid(self.masks[s](features[s])) * self.messages[s](features[s]) for s in self.messages)
        return features[self.target] + sum(gated)


class FeaturePropagation(nn.Module):
    """Fuse all tasks' coarse features (shared), select per task (SE), add to the task's own, hand on."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.fuse = conv_block(len(tasks) * channels, channels)
        self.select = nn.ModuleDict({t: SqueezeExcitationGate(channels) for t in tasks})
        self.tasks = tuple(tasks)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        fused = self.fuse(torch.cat([features[t] for t in self.tasks], dim=1))
        return {t: self.select[t](fused) + features[t] for t in self.tasks}  # residual onto the task's own


class MTINet(MultiTaskModel):
    """Two-scale MTI-Net: backbone, per-scale initial predictions, FPM, distillation, aggregation."""

    name = "mtinet"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int], channels: int = 16):
        super().__init__(tasks)
        require_positive(channels=channels)
        c = channels
        self.backbone_fine = conv_block(in_channels, c)  # scale 0: full resolution
        self.backbone_coarse = conv_block(c, c, pool=True)  # scale 1: half resolution
        self.coarse_blocks = nn.ModuleDict({t: conv_block(c, c) for t in tasks})
        self.fine_blocks = nn.ModuleDict({t: conv_block(2 * c, c) for t in tasks})  # [B_0, FPM]
        self.coarse_predictors = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})
        self.fine_predictors = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})
        self.propagation = FeaturePropagation(tasks, c)
        self.coarse_distillation = nn.ModuleDict({t: SourceGatedDistillation(t, tasks, c) for t in tasks})
        self.fine_distillation = nn.ModuleDict({t: SourceGatedDistillation(t, tasks, c) for t in tasks})
        self.aggregation_heads = nn.ModuleDict({t: conv_head(2 * c, out_dims[t], hidden_channels=c) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> MTINet:
        if not (problem.is_image and problem.dense):
            raise ValueError("MTI-Net predicts dense maps; it needs a dense image problem")
        require_image_side(problem.input_shape, 2, "its encoder halves the feature map")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=width, **kwargs)

    def forward_with_intermediate(
        self, x: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """``(final, {"scale0": {task: P}, "scale1": {task: P}})``, all at input resolution."""
        fine = self.backbone_fine(x)
        coarse = self.backbone_coarse(fine)
        # Coarsest scale first: initial task features and predictions.
        coarse_feats = {t: self.coarse_blocks[t](coarse) for t in self.tasks}
        # FPM: hand the coarse task information to the fine scale.
        propagated = self.propagation(coarse_feats)
        fine_feats = {
            t: self.fine_blocks[t](torch.cat([fine, _upsample_to(propagated[t], fine)], dim=1))
            for t in self.tasks
        }
        intermediate = {
            "scale0": {t: self.fine_predictors[t](fine_feats[t]) for t in self.tasks},
            "scale1": {t: _upsample_to(self.coarse_predictors[t](coarse_feats[t]), x) for t in self.tasks},
        }
        # Multi-modal distillation within each scale, then aggregation across scales.
        final = {}
        for t in self.tasks:
            d_fine = self.fine_distillation[t](fine_feats)
            d_coarse = _upsample_to(self.coarse_distillation[t](coarse_feats), d_fine)
            final[t] = self.aggregation_heads[t](torch.cat([d_fine, d_coarse], dim=1))
        return final, intermediate

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_intermediate(x)[0]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Distillation into ``task`` at both scales, its aggregation head and its predictors.

        Task blocks and the FPM feed every task through distillation: they are shared.
        """
        for module in (self.coarse_distillation[task], self.fine_distillation[task],
                       self.aggregation_heads[task], self.coarse_predictors[task],
                       self.fine_predictors[task]):
            yield from module.parameters()
