"""MultiNet: one shared encoder, separate classification, detection and segmentation decoders.

Teichmann, Weber, Zöllner, Cipolla & Urtasun, "MultiNet: Real-time Joint Semantic
Reasoning for Autonomous Driving", IEEE Intelligent Vehicles Symposium (IV) 2018,
arXiv:1612.07695 (code: github.com/MarvinTeichmann/MultiNet).

Hard parameter sharing built for speed: the convolutional part of VGG is computed once
per image and three decoders, each designed for its task, read it:

* **classification** (road type): a 1x1 convolution bottleneck on the encoder's last
  features, then a fully connected layer;
* **detection** (cars, KittiBox): a 1x1 bottleneck, then per cell of the encoder's
  output grid a 1x1 layer predicting a confidence and a box;
* **segmentation** (road, KittiSeg): an FCN decoder. A 1x1 layer scores the last
  features, transposed convolutions upsample the scores by 2 at a time, and at each
  scale the scores of the encoder layer of that resolution are added (FCN skip
  connections), until the input resolution is reached.

The joint loss is the sum of the three task losses, so the encoder's gradient is the
sum of every task's gradient while each decoder only learns from its own task.

Mapping to a :class:`Problem`: dense tasks get the segmentation decoder, image-level
tasks the classification decoder; tasks named in ``detection_tasks`` get the detection
decoder and return a ``(B, out_dim, H', W')`` grid at the encoder's stride. The
classification decoder averages over space before its linear layer (the paper flattens
a fixed-size map). There is no :meth:`encode`: the segmentation decoder also reads the
earlier encoder layers, so no single tensor is the shared representation.

Left out: the VGG-16 / ResNet encoder pre-trained on ImageNet, the detection decoder's
rezoom layer (ROI pooling that refines boxes) and its loss, the losses themselves (this module
returns predictions; the harness supplies each task's loss, where the paper uses cross-entropy,
Eq. (1), for classification and segmentation and, for detection, a cross-entropy on the cell
confidences plus Eq. (2), an L1 loss on box centre, width and height counted only in cells with
a positive label), and the training schedule (each loss's gradient from its own mini-batch,
merged with equal weights, and two detection-only updates after each joint one). The
detection bottleneck here has a ReLU like the classification one; the authors' KittiBox code
makes it a plain linear map (with dropout) and scales the box outputs by 50, scales the
detection input by 0.1 and uses no biases in its detection layers. The official segmentation
decoder is FCN-8s: two skips (pool4, pool3), one final x8 upsampling, transposed convolutions
started as bilinear upsampling and skip layers started near zero; here a skip at every block
and x2 each time. Its shipped configuration (multinet3.json) runs joint updates only, without
the two detection-only ones. Equation numbers
are those of the arXiv:1612.07695 preprint text, read in a copy without a version stamp made in
November 2017, before the IV 2018 version.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

from torch import Tensor, nn

from .base import MultiTaskModel, require_image_side
from .encoders import ConvEncoder
from .registry import Problem


class ClassificationDecoder(nn.Module):
    """1x1 bottleneck + ReLU, spatial average, linear layer: one score vector per image."""

    def __init__(self, channels: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, bottleneck, 1), nn.ReLU())
        self.fc = nn.Linear(bottleneck, out_dim)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.fc(self.bottleneck(features[-1]).mean(dim=(2, 3)))


class DetectionDecoder(nn.Module):
    """1x1 bottleneck + ReLU, then per grid cell a 1x1 layer: confidences and box parameters."""

    def __init__(self, channels: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, bottleneck, 1), nn.ReLU())
        self.predict = nn.Conv2d(bottleneck, out_dim, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.predict(self.bottleneck(features[-1]))


class SegmentationDecoder(nn.Module):
    """FCN: score the last layer, then upsample x2 and add the scores of each earlier layer."""

    def __init__(self, channels: int, depth: int, out_dim: int):
        super().__init__()
        self.scores = nn.ModuleList(nn.Conv2d(channels, out_dim, 1) for _ in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(out_dim, out_dim, 4, stride=2, padding=1) for _ in range(depth)
        )

    def forward(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        score = self.scores[-1](features[-1])
        for k in range(len(features) - 2, -1, -1):  # FCN skips, coarse to fine
            skip = self.scores[k](features[k])
            score = self.ups[k + 1](score, output_size=skip.shape[-2:]) + skip
        return self.ups[0](score, output_size=tuple(size))  # the first block also pooled


class MultiNet(MultiTaskModel):
    """A pooling conv encoder shared by all tasks; one task-specific decoder per task."""

    name = "multinet"
    equations_checked_in = "the arXiv:1612.07695 preprint text"

    def __init__(
        self,
        tasks: Sequence[str],
        encoder: ConvEncoder,
        out_dims: Mapping[str, int],
        dense: bool = True,
        detection_tasks: Collection[str] = (),
        bottleneck: int = 8,
    ):
        super().__init__(tasks)
        if encoder.downsample == 1:
            raise ValueError("MultiNet's FCN decoder expects an encoder that pools (pool=True)")
        self.encoder = encoder
        self.kinds = {
            t: "detection" if t in detection_tasks else "segmentation" if dense else "classification"
            for t in self.tasks
        }
        c, depth = encoder.out_channels, len(encoder.blocks)
        self.decoders = nn.ModuleDict({
            t: SegmentationDecoder(c, depth, out_dims[t]) if kind == "segmentation"
            else DetectionDecoder(c, bottleneck, out_dims[t]) if kind == "detection"
            else ClassificationDecoder(c, bottleneck, out_dims[t])
            for t, kind in self.kinds.items()
        })

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> MultiNet:
        if not problem.is_image:
            raise ValueError("MultiNet's decoders read convolutional feature maps; it needs an image problem")
        require_image_side(problem.input_shape, 4, "its encoder downsamples the feature map by 4")
        encoder = ConvEncoder(problem.input_shape[0], (width, width), pool=True)
        return cls(problem.tasks, encoder, problem.task_out_dims, dense=problem.dense, **kwargs)

    def features(self, x: Tensor) -> list[Tensor]:
        """The encoder's output after every block (strides 2, 4, ...)."""
        out = []
        for block in self.encoder.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.features(x)  # computed once, read by every decoder
        return {
            t: self.decoders[t](feats, x.shape[-2:]) if self.kinds[t] == "segmentation"
            else self.decoders[t](feats)
            for t in self.tasks
        }

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.decoders[task].parameters()

