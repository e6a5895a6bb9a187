"""MTLFace: attention splits one face feature map into an identity part and an age part.

Huang, Zhang, Shan, "When Age-Invariant Face Recognition Meets Face Age Synthesis: A
Multi-Task Learning Framework", CVPR 2021 (arXiv:2103.01520; code: github.com/Hzzone/MTLFace,
the first author's repository, linked from the paper's abstract).

Face recognition across ages (identity) and age estimation share one encoder, but they want
opposite things from it: identity should ignore age. MTLFace therefore splits the shared
feature map x in two with an attention module instead of letting both heads read all of x:

    a      = ( sigma(channel attention of x) + sigma(spatial attention of x) ) / 2
    x_age  = x * a                       read by the age tasks
    x_id   = x - x_age = x * (1 - a)     read by the identity task

so the two parts always add back to x, and every feature goes to the age part in proportion
a and to the identity part in proportion 1 - a. The channel attention pools x into a small
pyramid (average and max pooling to 1x1, 2x2 and 3x3 grids, the two summed), flattens it and
maps it through a bottleneck of two 1x1 convolutions to one weight per channel; the spatial
attention is a 7x7 convolution over the channel-wise max and mean of x, one weight per
position. Both end in batch norm and a sigmoid.

The identity conditional module (ICM) turns x_id into a face of a chosen age group for face
age synthesis. Instead of appending a one-hot age code, each age group owns a block of
``unit_channels`` channels of the module's convolutions and every other channel is masked to
zero; consecutive groups' blocks overlap by a fraction ``sigma`` of a block (the paper's
weight-sharing strategy, for smooth changes between neighbouring ages), so with G groups the
layers have D = unit + (G - 1)(1 - sigma) unit channels. The mask is applied after the
projection into D channels and after each convolution of a stack of residual blocks.

All of this follows the authors' code: backbone/aifr.py (AttentionModule: pyramid sizes
1, 2, 3, the reduction of 16, the 7x7 kernel, batch norm before each sigmoid, the average
of the two scaled copies, x_id = x - x_age) and common/networks.py (TaskRouter's channel
blocks, starting every (1 - sigma) unit channels; AgingModule's 1x1 projection, four
residual blocks and sigma = 0.1; seven age groups in the README's training command). The
paper's text was not available here, so no equation numbers are cited.

Task mapping (ours): the first task of the problem is the identity task and reads x_id, the
others are age tasks and read x_age, unless ``age_tasks`` names them. The heads are this
package's default heads (the authors use a CosFace classifier on a 512-d embedding and an
age regressor with an age-group classifier).

Left out: the IR-ResNet-50 encoder (a small convolutional trunk at input resolution here);
the cross-age domain adaptation (an age estimator on x_id behind gradient reversal, which
needs age labels the training loop does not give); the synthesis decoder's upsampling path
with skip connections from the encoder (a 1x1 convolution back to the image's channels,
added to the input image as the authors do, here), its PatchGAN discriminator and the
synthesis losses (adversarial, identity preservation, age classification of the synthesised
face); the second training phase, on a frozen encoder, that trains the synthesis
(:meth:`MTLFace.synthesize` itself lets gradients reach the encoder, tested; the official
synthesis phase runs the encoder frozen, without gradients and in eval mode, Hzzone/MTLFace
fas.py; freeze the encoder's parameters to follow that). The authors
size D as int((G - (G - 1) sigma) unit); here D ends where the last group's block ends, so no
channel is masked for every group, and the convolutions followed by batch norm have no bias
(the norm subtracts it, so it could never learn).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for

PYRAMID = (1, 2, 3)  # grid sizes of the channel attention's pooling pyramid


class AgeIdentityDecomposition(nn.Module):
    """x -> (x_id, x_age) with x_age = x * (channel weight + spatial weight) / 2."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        require_positive(channels=channels, reduction=reduction, kernel_size=kernel_size)
        pooled = channels * sum(s * s for s in PYRAMID)
        hidden = max(1, pooled // reduction)
        self.channel = nn.Sequential(
            nn.Conv2d(pooled, hidden, 1, bias=False), nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.Sigmoid())
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    @staticmethod
    def pyramid(x: Tensor) -> Tensor:
        """Average plus max pooling to each grid of PYRAMID, flattened: (B, C * 14, 1, 1)."""
        avg = [nn.functional.adaptive_avg_pool2d(x, s).flatten(1) for s in PYRAMID]
        top = [nn.functional.adaptive_max_pool2d(x, s).flatten(1) for s in PYRAMID]
        return (torch.cat(avg, dim=1) + torch.cat(top, dim=1))[:, :, None, None]

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One weight per channel (B, C, 1, 1) and one per position (B, 1, H, W), each in (0, 1)."""
        per_channel = self.channel(self.pyramid(x))
        per_position = self.spatial(torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1))
        return per_channel, per_position

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        per_channel, per_position = self.weights(x)
        x_age = (x * per_channel + x * per_position) / 2
        return x - x_age, x_age


def group_channel_masks(groups: int, unit: int, sigma: float) -> Tensor:
    """(groups, D) 0/1 masks: group g owns ``unit`` channels starting at int(g (1 - sigma) unit),
    accumulated the way the authors' TaskRouter steps, so neighbours share about sigma * unit."""
    starts, start = [], 0
    for _ in range(groups):
        starts.append(start)
        start = int(start + (1 - sigma) * unit)
    masks = torch.zeros(groups, starts[-1] + unit)
    for g, s in enumerate(starts):
        masks[g, s:s + unit] = 1
    return masks


class ConditionalResidualBlock(nn.Module):
    """conv-BN, keep the group's channels, PReLU, conv-BN, keep them again, add, PReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act1, self.act2 = nn.PReLU(channels), nn.PReLU(channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.act1(self.conv1(x) * mask)
        return self.act2(x + self.conv2(h) * mask)


class IdentityConditionalModule(nn.Module):
    """x_id and a target age group per example -> a face of that age (input image + residual)."""

    def __init__(self, channels: int, image_channels: int, age_groups: int = 7, unit_channels: int = 4,
                 sigma: float = 0.1, residual_blocks: int = 4):
        super().__init__()
        require_positive(age_groups=age_groups, unit_channels=unit_channels, residual_blocks=residual_blocks)
        if not 0 <= sigma <= 1:
            raise ValueError(f"sigma, the share of a block neighbouring age groups have in common, must be in [0, 1], got {sigma}")
        self.register_buffer("masks", group_channel_masks(age_groups, unit_channels, sigma))
        width = self.masks.shape[1]
        self.project = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        self.blocks = nn.ModuleList(ConditionalResidualBlock(width) for _ in range(residual_blocks))
        self.back = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.PReLU(channels))
        self.to_image = nn.Conv2d(channels, image_channels, 1)

    def forward(self, image: Tensor, x_id: Tensor, age_group: Tensor) -> Tensor:
        mask = self.masks.to(x_id.dtype)[age_group][:, :, None, None]  # (B, D, 1, 1)
        h = self.project(x_id) * mask
        for block in self.blocks:
            h = block(h, mask)
        return image + self.to_image(self.back(h))


class MTLFace(MultiTaskModel):
    """Shared trunk, attention split into x_id (identity task) and x_age (age tasks), plus the ICM."""

    name = "mtlface"
    training_procedure = ("face age synthesis, synthesize() through the identity conditional module, is "
                          "trained in a second phase on the frozen encoder with a GAN and identity and age losses")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, channels: int, heads: Mapping[str, nn.Module],
                 image_channels: int, age_tasks: Sequence[str] | None = None, reduction: int = 16,
                 age_groups: int = 7, unit_channels: int = 4, sigma: float = 0.1, residual_blocks: int = 4):
        super().__init__(tasks)
        self.age_tasks = tuple(self.tasks[1:] if age_tasks is None else age_tasks)
        unknown = set(self.age_tasks) - set(self.tasks)
        if unknown:
            raise ValueError(f"age_tasks names tasks that are not in the problem: {sorted(unknown)}")
        self.trunk = trunk
        self.decompose = AgeIdentityDecomposition(channels, reduction)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.icm = IdentityConditionalModule(channels, image_channels, age_groups, unit_channels, sigma,
                                             residual_blocks)
        self.age_groups = age_groups

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs) -> "MTLFace":
        if not problem.is_image:
            raise ValueError("MTLFace splits feature maps with a spatial attention: it needs image inputs")
        return cls(problem.tasks, trunk_for(problem.input_shape, width), width, heads_for(problem, width),
                   problem.input_shape[0], **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        x_id, x_age = self.decompose(z)
        return {t: self.heads[t](x_age if t in self.age_tasks else x_id) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def synthesize(self, x: Tensor, age_group: Tensor) -> Tensor:
        """Face age synthesis: the input images rendered at ``age_group`` (one index per example)."""
        x_id, _ = self.decompose(self.encode(x))
        return self.icm(x, x_id, age_group)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
