"""MNC: boxes, then a mask inside each box, then a category from the masked features.

Dai, He, Sun, "Instance-aware Semantic Segmentation via Multi-task Network Cascades", CVPR
2016 (arXiv:1512.04412; code: github.com/daijifeng001/MNC, the first author's repository,
a Python/Caffe re-implementation written at Microsoft Research, with its Caffe fork
daijifeng001/caffe-mnc for the RoI warping layer).

MNC splits instance segmentation into three tasks that run as a cascade on one shared
convolutional feature map F, each stage reading the output of the stage before:

    stage 1  boxes B     a region proposal head on F: per anchor, an objectness score and
                         box deltas (dx, dy, dw, dh), decoded as centre + delta * anchor size
                         and size * exp(delta)
    stage 2  masks M(B)  F cropped to each box and resampled to a fixed grid (RoI warping),
                         then two fully connected layers and a sigmoid give an m x m mask
    stage 3  C(M, B)     the box's warped features times its mask (resized to the features'
                         grid), and the unmasked box features, each max pooled 2 x 2 and
                         through a fully connected layer, concatenated, then a classifier

The paper's loss is L(B) + L(M(B)) + L(C(M(B), B)): later losses depend on the boxes, so
training end to end needs their gradient with respect to box coordinates. Plain RoI pooling
quantises the box and has none; MNC's RoI warping samples F bilinearly at points placed
linearly inside the box, so every sample, and everything after it, is differentiable in the
box corners (tested here against the analytic derivative, and through all three stages).

Grounding: the stage layout comes from the authors' models/VGG16/mnc_5stage/test.prototxt
(RoI warping of conv5 to 28 x 28 then 2 x 2 max pooling, an fc layer of 256, then an fc
layer to a 21 x 21 sigmoid mask; the mask resized to the 14 x 14 RoI grid and multiplied in
("MaskPooling"); two paths, masked and unmasked, each 2 x 2 max pooled to 7 x 7 before its fc
layers, concatenated before the class scores),
the box decoding and its gradient from lib/pylayer/proposal_layer.py, and the bilinear sampling from
caffe-mnc's roi_warping_layer.cu. The paper's text was not available here, so no equation
numbers are cited.

Task mapping (ours): the problem's tasks are categorisation heads of stage 3 (each its own
linear classifier on the joined features); stages 1 and 2 are shared. A pooled task's output
is the RoIs' scores averaged with weights softmax(objectness) over the RoIs; a dense task's
output pastes each RoI's mask back into the image at its box (zero outside it) times that
RoI's scores and weight, summed over RoIs, the way MNC's instance masks make a labelled image,
and gives the share of a pixel no mask covers a learned per-task background output (MNC's
classifier has a background class; an output of exactly zero there would also make a
normalised output, such as surface normals, 0 / 0).
Weighting by objectness is our choice (in MNC it ranks and filters proposals), made so that
the proposal head trains from task losses alone. :meth:`MNC.stages` returns every stage's
output for the paper's per-stage losses.

Left out: the VGG-16 backbone (a small convolutional trunk at input resolution here);
anchors at every position with three scales and three ratios, proposal selection (non-maximum
suppression, the top 300) and the stage losses with their label assignment (a fixed grid of
anchor_grid x anchor_grid anchors, all kept, here); the 5-stage cascade that repeats box
regression and classification; the authors' forward pass rounds the RoI to feature cells
(its backward pass still gives the box gradient; autograd would give none, so nothing is
rounded here) and clips boxes to the image (samples past the border read the border here, where the
authors' code reads zero beyond half a cell). Samples sit at bin centres (the authors' at bin
starts), and each stage-3 path has one fc layer instead of two (fc6 and fc7 of
4096 in the authors' model); sizes are toy defaults (roi_size 4 for their 14, mask_size 6
for their 21).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .bilinear import grid_sample
from .encoders import trunk_for


def grid_anchors(grid: int, height: int, width: int) -> Tensor:
    """(grid * grid, 4) boxes (x1, y1, x2, y2) tiling an image of height x width."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cell_w, cell_h = width / grid, height / grid
    boxes = torch.stack([xs * cell_w, ys * cell_h, (xs + 1) * cell_w, (ys + 1) * cell_h], dim=-1)
    return boxes.view(-1, 4).float()


MAX_LOG_SCALE = math.log(1000 / 16)


def decode_boxes(anchors: Tensor, deltas: Tensor) -> Tensor:
    """Anchor (R, 4) plus deltas (B, R, 4) -> boxes (B, R, 4): shift the centre by dx times the
    anchor's width, scale the width by exp(dw) (same for y and h).

    dw and dh are capped at log(1000 / 16), as later Faster R-CNN decoders do (MNC's own
    lib/transform/bbox_transform.py has no cap), so a diverging step gives a large box, not an
    infinite one that the warping would sample at inf."""
    size = anchors[:, 2:] - anchors[:, :2]
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2 + deltas[..., :2] * size
    half = size * torch.exp(deltas[..., 2:].clamp(max=MAX_LOG_SCALE)) / 2
    return torch.cat([centre - half, centre + half], dim=-1)


def sample_points(boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """x (B, R, size) and y (B, R, size) of the bin centres of a size x size grid in each box."""
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return x1[..., None] + steps * (x2 - x1)[..., None], y1[..., None] + steps * (y2 - y1)[..., None]


def roi_warp(features: Tensor, boxes: Tensor, size: int) -> Tensor:
    """RoI warping: (B, C, H, W) features sampled bilinearly on a size x size grid inside each of
    the (B, R, 4) boxes -> (B, R, C, size, size), differentiable in the box coordinates.

    Coordinates are in feature cells, cell k spanning [k, k + 1), so its centre is k + 0.5."""
    b, c, height, width = features.shape
    xs, ys = sample_points(boxes, size)
    gx = (2 * xs / width - 1)[..., None, :].expand(*xs.shape[:2], size, size)  # (B, R, size_y, size_x)
    gy = (2 * ys / height - 1)[..., :, None].expand(*ys.shape[:2], size, size)
    grid = torch.stack([gx, gy], dim=-1).flatten(1, 2)  # (B, R * size, size, 2)
    out = grid_sample(features, grid, "border")
    return out.view(b, c, -1, size, size).transpose(1, 2)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, R, m, m) masks placed into a height x width image at their boxes, zero outside: (B, R, H, W).

    Pixel centres inside a box read its mask bilinearly (the box's edge cells read the edge);
    the values stay differentiable in the box through where they sample the mask."""
    b, r, m, _ = masks.shape
    x1, y1, x2, y2 = (v[..., None] for v in boxes.unbind(-1))
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype) + 0.5
    gx = (2 * (xs - x1) / (x2 - x1) - 1)[..., None, :].expand(b, r, height, width)
    gy = (2 * (ys - y1) / (y2 - y1) - 1)[..., :, None].expand(b, r, height, width)
    grid = torch.stack([gx, gy], dim=-1)
    pasted = grid_sample(masks.flatten(0, 1)[:, None], grid.flatten(0, 1), "border").view(b, r, height, width)
    inside = (grid.abs() <= 1).all(dim=-1)  # pixel centres inside the box (no gradient, a step)
    return pasted * inside.to(pasted.dtype)


class MNC(MultiTaskModel):
    """Shared features -> stage 1 boxes -> stage 2 masks in the boxes -> stage 3 categories."""

    name = "mnc"
    training_procedure = ("each stage has its own loss on box, mask and category labels, on proposals "
                          "filtered by non-maximum suppression, which stages() exposes")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, channels: int, out_dims: Mapping[str, int],
                 dense: bool, anchor_grid: int = 2, roi_size: int = 4, mask_size: int = 6, hidden: int = 32):
        super().__init__(tasks)
        require_positive(channels=channels, anchor_grid=anchor_grid, roi_size=roi_size, mask_size=mask_size,
                         hidden=hidden)
        self.trunk, self.dense = trunk, dense
        self.anchor_grid, self.roi_size, self.mask_size = anchor_grid, roi_size, mask_size
        # Stage 1: a 3x3 conv, then per position one objectness score and four box deltas.
        self.proposal = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, 5, 1))
        # Stage 2: warped features at twice the grid, 2x2 max pooling, fc, fc to an m x m mask.
        roi_features = channels * roi_size * roi_size
        self.mask_head = nn.Sequential(nn.Flatten(), nn.Linear(roi_features, hidden), nn.ReLU(),
                                       nn.Linear(hidden, mask_size * mask_size))
        # Stage 3: masked and unmasked box features, each 2x2 max pooled (Caffe's ceil mode), through
        # an fc layer, joined.
        pooled_features = channels * math.ceil(roi_size / 2) ** 2
        self.masked_path = nn.Sequential(nn.Flatten(), nn.Linear(pooled_features, hidden), nn.ReLU())
        self.box_path = nn.Sequential(nn.Flatten(), nn.Linear(pooled_features, hidden), nn.ReLU())
        self.classifiers = nn.ModuleDict({t: nn.Linear(2 * hidden, out_dims[t]) for t in self.tasks})
        # Dense tasks: what a pixel no box covers shows (MNC's classifier has a background class).
        self.background = nn.ParameterDict({t: nn.Parameter(torch.randn(out_dims[t])) for t in self.tasks}) if dense else None

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs) -> "MNC":
        if not problem.is_image:
            raise ValueError("MNC proposes boxes on a feature map and warps features inside them: it needs image inputs")
        return cls(problem.tasks, trunk_for(problem.input_shape, width), width, problem.out_dims, problem.dense,
                   **kwargs)

    def propose(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stage 1: objectness (B, R), deltas (B, R, 4) read at the anchors' centres, and boxes (B, R, 4)."""
        height, width = features.shape[-2:]
        anchors = grid_anchors(self.anchor_grid, height, width).to(features)
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2 / anchors.new_tensor([width, height]) * 2 - 1
        grid = centres[None, None].expand(features.shape[0], 1, -1, 2)
        read = grid_sample(self.proposal(features), grid)[:, :, 0].transpose(1, 2)
        deltas = read[..., 1:]
        return read[..., 0], deltas, decode_boxes(anchors, deltas)

    def estimate_masks(self, features: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: RoI features (B, R, C, s, s) and mask probabilities (B, R, m, m) for each box."""
        b, r = boxes.shape[:2]
        warped = roi_warp(features, boxes, 2 * self.roi_size).flatten(0, 1)
        roi = F.max_pool2d(warped, 2)
        masks = torch.sigmoid(self.mask_head(roi)).view(b, r, self.mask_size, self.mask_size)
        return roi.view(b, r, *roi.shape[1:]), masks

    def masked_features(self, roi: Tensor, masks: Tensor) -> Tensor:
        """The box's features times its mask, resized to the features' grid."""
        resized = F.interpolate(masks.flatten(0, 1)[:, None], size=roi.shape[-2:], mode="bilinear",
                                align_corners=False)
        return roi * resized.view(*masks.shape[:2], 1, *roi.shape[-2:])

    def categorize(self, roi: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Stage 3: per task, scores (B, R, d_t) from the masked and the unmasked box features,
        each max pooled 2x2 before its fc layer."""
        masked = self.masked_path(F.max_pool2d(self.masked_features(roi, masks).flatten(0, 1), 2, ceil_mode=True))
        box = self.box_path(F.max_pool2d(roi.flatten(0, 1), 2, ceil_mode=True))
        joined = torch.cat([masked, box], dim=1)
        return {t: self.classifiers[t](joined).view(*roi.shape[:2], -1) for t in self.tasks}

    def stages(self, features: Tensor) -> dict[str, object]:
        """Every stage's output on shared features, each computed from the one before."""
        objectness, deltas, boxes = self.propose(features)
        roi, masks = self.estimate_masks(features, boxes)
        return {"objectness": objectness, "deltas": deltas, "boxes": boxes, "masks": masks,
                "scores": self.categorize(roi, masks)}

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        s = self.stages(z)
        weights = torch.softmax(s["objectness"], dim=1)  # (B, R)
        if not self.dense:
            return {t: torch.einsum("br,brd->bd", weights, v) for t, v in s["scores"].items()}
        pasted = paste_masks(s["masks"], s["boxes"], *z.shape[-2:]) * weights[..., None, None]
        uncovered = 1 - pasted.sum(dim=1, keepdim=True)  # (B, 1, H, W), in [0, 1]
        return {t: torch.einsum("brhw,brd->bdhw", pasted, v) + uncovered * self.background[t][:, None, None]
                for t, v in s["scores"].items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.classifiers[task].parameters()
        if self.background is not None:
            yield self.background[task]
