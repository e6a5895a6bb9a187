"""MTA: per-task CBAM attention paths over a shared encoder's stages (end-to-end driving).

Ishihara, Kanervisto, Miura, Hautamäki, "Multi-task Learning with Attention for End-to-end
Autonomous Driving", CVPR Workshops 2021, arXiv:2104.10753.

The driving network sees a camera image and predicts the controls together with three
auxiliary outputs that need labels only at training time: semantic segmentation, depth
and the state of the traffic light. All of them share one ResNet-34 encoder; what each
task reads from it goes through attention modules of its own, so a task can pick the
spatial regions and channels it needs (the paper shows the traffic-light path looking at
the light). One attention module takes a feature map x and

    a = CBAM(x)                     channel gate, then spatial gate (Woo et al., 2018)
    a = a + previous module's output (if there is one)
    y = a + x                       residual
    y = avgpool2(conv3x3(y)) + maxpool2(conv3x3(y))    (not in the last module of a path)
    out = ReLU(BN(y))

where the 3x3 convolution doubles the channels and the two poolings halve the resolution,
so the output has exactly the shape of the encoder's next stage and feeds the next module.
The dense tasks (segmentation, depth) each have a path of one module per encoder stage
(7x7 spatial-gate kernels except in the last two modules, which use 3x3), ending at the
deepest features, which their decoder upsamples; the image-level tasks (traffic light,
controls) each have a single module on the deepest features (3x3 kernel, no pooling)
before their head.

CBAM, as the authors' code builds it: the channel gate sends the global average- and the
global max-pooled vector through one shared two-layer MLP (reduction 16, ReLU), adds the
two results and multiplies x by their sigmoid; the spatial gate stacks the channel-wise
max and mean, convolves them to one map with the module's kernel and multiplies by its
sigmoid.

Sources: the authors' release (github.com/KeishiIshihara/multitask-with-attention, the
first author's account; its README names the paper): ``model/mta.py`` (``MTA.build_model``,
``TaskAttentionModuleSoft``, ``soft_attention_network``: which tasks get a path over the
stages and which get one module, the kernels and the pooling) and ``model/common_layers.py``
(``CbamBlock``, ``ChannelGate``, ``SpatialGate``). One deviation: the released
``SpatialGate`` multiplies x by the convolution's output *before* the sigmoid (the sigmoid
map is only returned, for visualisation); we gate with the sigmoid, as CBAM (which the file
says it implements) does and as the visualised masks suggest.

Left out: ResNet-34 (here a small encoder of ``num_stages`` stages, each a 3x3 convolution
with ReLU, every stage after the first doubling the channels and halving the resolution
like a ResNet stage), the task decoders (upsampling stacks for segmentation and depth,
two fully connected layers for the traffic light: here the maps are resized to the input
and read by the package's default heads), the control branch's extra inputs (measured
speed, and the navigation command that picks one of four branches of steering, throttle
and brake heads, as in conditional imitation learning), the loss weights and class
weights of ``MTA.loss_fn``, CARLA and the driving benchmarks. Our choices: the channel
gate's hidden width is ``max(1, channels // reduction)``, so narrow toy layers still have one,
and the module's 3x3 convolution has no bias (the authors' Keras layer has one, but the batch
norm that follows cancels it, so it never gets a gradient).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, require_image_side
from .encoders import conv_block, heads_for


class ChannelGate(nn.Module):
    """x times sigmoid(MLP(avgpool x) + MLP(maxpool x)), one weight per channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(scores)[:, :, None, None]


class SpatialGate(nn.Module):
    """x times sigmoid(conv([max over channels, mean over channels])), one weight per pixel."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def mask(self, x: Tensor) -> Tensor:
        """The (B, 1, H, W) spatial attention map in (0, 1)."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask(x)


class TaskAttentionModule(nn.Module):
    """CBAM(x) plus the previous module's output, plus x; then (optionally) double the
    channels and halve the resolution with avg + max pooling; then BN and ReLU."""

    def __init__(self, channels: int, kernel_size: int, downsample: bool, reduction: int = 16):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)
        # no bias: batch norm right after removes any per-channel constant, so it would never learn
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False) if downsample else None
        self.norm = nn.BatchNorm2d(2 * channels if downsample else channels)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> Tensor:
        attended = self.spatial_gate(self.channel_gate(x))
        if previous is not None:
            attended = attended + previous
        y = attended + x
        if self.conv is not None:
            y = self.conv(y)
            y = F.avg_pool2d(y, 2) + F.max_pool2d(y, 2)
        return torch.relu(self.norm(y))


def attention_path(widths: Sequence[int], reduction: int) -> nn.ModuleList:
    """One module per stage of ``widths``: 7x7 kernels except the last two (3x3), and each
    module but the last maps its stage's shape onto the next stage's (soft_attention_network)."""
    n = len(widths)
    return nn.ModuleList(
        TaskAttentionModule(c, 7 if i < n - 2 else 3, downsample=i < n - 1, reduction=reduction)
        for i, c in enumerate(widths)
    )


class MTADriving(MultiTaskModel):
    """Shared ``stages`` (a ResNet-like encoder), per-task attention paths, one head per task."""

    name = "mta_driving"

    def __init__(
        self,
        tasks: Sequence[str],
        stages: Sequence[nn.Module],
        widths: Sequence[int],
        heads: Mapping[str, nn.Module],
        dense: bool,
        reduction: int = 16,
    ):
        super().__init__(tasks)
        require_positive(num_stages=len(stages), reduction=reduction)
        if len(widths) != len(stages) or any(b != 2 * a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"each stage must double the channels of the one before, got widths {list(widths)}")
        self.stages = nn.ModuleList(stages)
        self.dense = dense
        if dense:  # segmentation, depth: a path over every stage
            self.paths = nn.ModuleDict({t: attention_path(widths, reduction) for t in self.tasks})
        else:  # traffic light, controls: one module on the deepest features
            self.paths = nn.ModuleDict({
                t: nn.ModuleList([TaskAttentionModule(widths[-1], 3, downsample=False, reduction=reduction)])
                for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, num_stages: int = 3, reduction: int = 16) -> "MTADriving":
        require_positive(width=width, num_stages=num_stages, reduction=reduction)
        shape = tuple(problem.input_shape)
        if len(shape) != 3:
            raise ValueError(f"MTA's attention modules work on feature maps: it needs images (C, H, W), got {shape}")
        require_image_side(shape, 2 ** (num_stages - 1), f"{num_stages} stages halve the image {num_stages - 1} times")
        widths = [width * 2**i for i in range(num_stages)]
        stages = [conv_block(shape[0], width)] + [conv_block(a, b, pool=True) for a, b in zip(widths, widths[1:])]
        heads = heads_for(problem, widths[-1])
        return cls(problem.tasks, stages, widths, heads, problem.dense, reduction)

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """The shared encoder's feature map after every stage."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def attend(self, task: str, features: Sequence[Tensor]) -> Tensor:
        """Task ``task``'s attended deepest features: its path over the stages it reads."""
        path = self.paths[task]
        read = features if self.dense else features[-1:]
        previous = None
        for module, x in zip(path, read):
            previous = module(x, previous)
        return previous

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.stage_outputs(x)
        outputs = {}
        for t in self.tasks:
            z = self.attend(t, features)
            if self.dense:  # the decoder's job here: back to the input's resolution
                z = F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)
            outputs[t] = self.heads[t](z)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.paths[task].parameters()
        yield from self.heads[task].parameters()
