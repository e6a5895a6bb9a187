"""Painter: every task's output is an image, and the task is named by an example image pair.

Wang, Wang, Cao, Shen, Huang. "Images Speak in Images: A Generalist Painter for In-Context
Visual Learning", CVPR 2023 (arXiv:2212.02499). The structure follows the authors' code
(github.com/baaivision/Painter, ``Painter/models_painter.py`` and ``data/pairdataset.py``);
the paper's formulas are not checked here by number, so the steps are named.

Painter turns the outputs of dense tasks (depth, segmentation, keypoints, restoration) into
images and learns them all by masked image modelling over *pairs of pairs*:

    stitching   two input/output examples of the same task are placed one above the other:
                an input canvas [prompt image; query image] and an output canvas
                [prompt output; query output], each twice as tall as one image
    masking     random patches of the output canvas are replaced by a learned mask token
                (at inference: the whole query output, so the prompt pair is the only
                hint of which task to perform)
    encoder     both canvases are cut into patches and embedded, with a segment embedding
                telling input from output and a shared position embedding; the first
                blocks of a ViT run on each canvas separately, then the two token streams
                are averaged patch by patch and the remaining blocks run on the merged one
    decoder     features of several blocks (four evenly spaced ones in Painter, the last
                ``feature_blocks`` here) are concatenated, projected to p x p pixels per
                patch and refined by a small convolutional head
    loss        smooth-L1 (beta 0.01) between predicted and true output pixels, averaged
                over the *masked* patches only

Training (:meth:`Painter.training_loss`) needs the query's own output, which ``forward`` does
not have: the training harness instead scores ``forward(x)``, i.e. regresses the query output
painted from the stored prompt with the whole query masked, against each task's loss, and
never runs masked image modelling over pairs of examples (``training_procedure`` says so).

No weight belongs to a task: ``forward(x)`` answers task t by stitching t's stored prompt
pair above the query, masking the query's output and reading the painted prediction. The
stored prompts start as random placeholders (:meth:`Painter.from_problem`); real use calls
:meth:`Painter.set_prompt` with a labelled example. The output canvas has as many channels
as the widest task (Painter uses RGB); a task reads its first channels, and an image-level
task is painted as a constant image and read back as the mean of its prediction.
Input and output canvases get separate patch projections because their channel counts
differ here (Painter shares one across its RGB canvases). Vector inputs are refused: the
method paints images next to images.

Left out: the ViT-L backbone with MAE initialisation, windowed attention and relative
positions, block-wise (instead of per-patch random) masking, the ``valid`` pixel weights
and the filter for empty targets, the dataset mixture and prompt selection, drop path and
the layer-wise learning-rate decay, and the scale (896 x 448 canvases, 24 blocks). The
official training also masks the whole query half in 10 % of samples, uses an MLP ratio of 4
(2 here) and runs 3 blocks on each canvas separately before merging them (1 by default here;
baaivision/Painter).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import patch_size_for
from .registry import Problem


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stitch(top: Tensor, bottom: Tensor) -> Tensor:
    """Place two (B, C, H, W) images one above the other: (B, C, 2H, W)."""
    return torch.cat([top, bottom], dim=-2)


def masked_loss(prediction: Tensor, target: Tensor, mask: Tensor, patch: int) -> Tensor:
    """Smooth-L1 over the pixels of masked patches only; ``mask`` is (B, h, w) over patches."""
    pixels = mask[:, None].repeat_interleave(patch, -2).repeat_interleave(patch, -1).expand_as(target)
    loss = F.smooth_l1_loss(prediction, target, reduction="none", beta=0.01)
    return (loss * pixels).sum() / (pixels.sum() + 1e-2)


class Painter(MultiTaskModel):
    """A small ViT that paints the masked output canvas of a stitched prompt + query pair."""

    name = "painter"
    training_procedure = ("it is trained by masked image modelling: pairs of examples of one task are "
                          "stitched and training_loss() scores random_mask() patches of the output canvas")

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: Mapping[str, int],
        image_size: tuple[int, int] = (8, 8),
        dense: bool = True,
        dim: int = 16,
        depth: int = 3,
        num_heads: int = 2,
        separate_blocks: int = 1,
        feature_blocks: int = 2,
        decoder_dim: int = 8,
    ):
        super().__init__(tasks)
        require_positive(decoder_dim=decoder_dim)
        if not 1 <= separate_blocks < depth or not 1 <= feature_blocks <= depth - separate_blocks:
            raise ValueError(f"need 1 <= separate_blocks < depth and 1 <= feature_blocks <= depth - separate_blocks, "
                             f"got separate_blocks={separate_blocks}, feature_blocks={feature_blocks}, depth={depth}")
        self.out_dims, self.dense = {t: out_dims.get(t, 1) for t in self.tasks}, dense
        self.image_size, self.canvas_channels = tuple(image_size), max(self.out_dims.values())
        self.patch = patch_size_for(*image_size)
        self.grid = (2 * image_size[0] // self.patch, image_size[1] // self.patch)  # stitched pair
        self.separate_blocks, self.feature_blocks = separate_blocks, feature_blocks
        self.image_embed = nn.Conv2d(in_channels, dim, self.patch, stride=self.patch)
        self.canvas_embed = nn.Conv2d(self.canvas_channels, dim, self.patch, stride=self.patch)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.segment_image = nn.Parameter(torch.randn(dim) * 0.02)
        self.segment_canvas = nn.Parameter(torch.randn(dim) * 0.02)
        self.positions = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)
        split_width(dim, num_heads)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)  # a ViT block: GELU MLP
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(feature_blocks * dim, self.patch**2 * decoder_dim)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1), ChannelNorm(decoder_dim), nn.GELU(),
            nn.Conv2d(decoder_dim, self.canvas_channels, 1),
        )

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, seed: int = 0, **kw: object) -> "Painter":
        if not problem.is_image:
            raise ValueError("Painter paints output images next to input images: it needs image inputs (C, H, W)")
        model = cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                    tuple(problem.input_shape[1:]), problem.dense, dim=width, **kw)
        g = torch.Generator().manual_seed(seed)  # placeholder prompt pairs; see set_prompt
        for t, c in problem.task_out_dims.items():
            output_shape = (c, *problem.input_shape[1:]) if problem.dense else (c,)
            model.set_prompt(t, torch.randn(*problem.input_shape, generator=g), torch.randn(*output_shape, generator=g))
        return model

    # ----- prompts and canvases -------------------------------------------------------------

    def as_canvas(self, output: Tensor) -> Tensor:
        """A task output (B, c, H, W) or (B, c) as a (B, canvas channels, H, W) image."""
        if output.dim() == 2:  # image-level: painted as a constant image
            output = output[:, :, None, None].expand(-1, -1, *self.image_size)
        return F.pad(output, (0, 0, 0, 0, 0, self.canvas_channels - output.shape[1]))

    def set_prompt(self, task: str, image: Tensor, output: Tensor) -> None:
        """Store ``task``'s example pair: an image (C, H, W) and its output (c, H, W) or (c,)."""
        i, like = self.tasks.index(task), next(self.parameters())  # stored where the model is now
        self.register_buffer(f"prompt_image_{i}", image[None].to(like))
        self.register_buffer(f"prompt_canvas_{i}", self.as_canvas(output[None].to(like)))

    def prompt(self, task: str) -> tuple[Tensor, Tensor]:
        i = self.tasks.index(task)
        return getattr(self, f"prompt_image_{i}"), getattr(self, f"prompt_canvas_{i}")

    def query_mask(self, batch: int, device: torch.device) -> Tensor:
        """Inference mask (B, h, w): the whole query output (lower half) is hidden."""
        mask = torch.zeros(batch, *self.grid, dtype=torch.bool, device=device)
        mask[:, self.grid[0] // 2:] = True
        return mask

    def random_mask(self, batch: int, generator: torch.Generator, ratio: float = 0.5) -> Tensor:
        """Training mask (B, h, w): ``ratio`` of the output canvas's patches, chosen at random."""
        n = self.grid[0] * self.grid[1]
        rank = torch.rand(batch, n, generator=generator).argsort(-1).argsort(-1)
        return (rank < round(ratio * n)).view(batch, *self.grid)

    # ----- the network -----------------------------------------------------------------------

    def encode_canvases(self, images: Tensor, canvas: Tensor, mask: Tensor) -> list[Tensor]:
        """Normalised features (B, N, dim) of the last ``feature_blocks`` blocks."""
        b = images.shape[0]
        x = self.image_embed(images).flatten(2).transpose(1, 2) + self.segment_image
        y = self.canvas_embed(canvas).flatten(2).transpose(1, 2)
        y = torch.where(mask.flatten(1)[..., None], self.mask_token, y) + self.segment_canvas
        h = torch.cat([x, y]) + self.positions  # the two canvases as separate sequences
        features = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i + 1 == self.separate_blocks:
                h = (h[:b] + h[b:]) / 2  # merge input and output tokens patch by patch
            if i >= len(self.blocks) - self.feature_blocks:
                features.append(self.norm(h))
        return features

    def decode_canvas(self, features: list[Tensor]) -> Tensor:
        """Concatenated features -> p x p pixels per patch -> conv head: (B, canvas, 2H, W)."""
        z = self.decoder_embed(torch.cat(features, dim=-1))  # (B, N, p*p*decoder_dim)
        z = z.transpose(1, 2).reshape(z.shape[0], -1, *self.grid)
        return self.decoder_pred(F.pixel_shuffle(z, self.patch))

    def paint(self, prompt_image: Tensor, prompt_canvas: Tensor, query: Tensor,
              query_canvas: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """The predicted output canvas (B, canvas, 2H, W) of [prompt pair; query pair]."""
        if query_canvas is None:
            query_canvas = torch.zeros_like(prompt_canvas.expand(query.shape[0], -1, -1, -1))
        if mask is None:
            mask = self.query_mask(query.shape[0], query.device)
        images = stitch(prompt_image.expand(query.shape[0], -1, -1, -1), query)
        canvas = stitch(prompt_canvas.expand(query.shape[0], -1, -1, -1), query_canvas)
        return self.decode_canvas(self.encode_canvases(images, canvas, mask))

    def training_loss(self, prompt_image: Tensor, prompt_output: Tensor, image: Tensor, output: Tensor,
                      mask: Tensor) -> Tensor:
        """Painter's objective on one stitched batch: smooth-L1 on the masked output patches."""
        prompt_canvas, query_canvas = self.as_canvas(prompt_output), self.as_canvas(output)
        prompt_canvas = prompt_canvas.expand(image.shape[0], -1, -1, -1)
        prediction = self.paint(prompt_image, prompt_canvas, image, query_canvas, mask)
        return masked_loss(prediction, stitch(prompt_canvas, query_canvas), mask, self.patch)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        prompts = [self.prompt(t) for t in self.tasks]  # all tasks in one batch
        images = torch.cat([p[0].expand(x.shape[0], -1, -1, -1) for p in prompts])
        canvases = torch.cat([p[1].expand(x.shape[0], -1, -1, -1) for p in prompts])
        painted = self.paint(images, canvases, x.repeat(len(self.tasks), 1, 1, 1))
        answers = painted[..., self.image_size[0]:, :].chunk(len(self.tasks))  # the query's half
        outputs = {}
        for t, answer in zip(self.tasks, answers):
            answer = answer[:, : self.out_dims[t]]
            outputs[t] = answer if self.dense else answer.mean(dim=(2, 3))
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """None: a task is named only by its prompt pair; every weight is shared."""
        return iter(())
