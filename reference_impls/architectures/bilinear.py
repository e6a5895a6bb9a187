"""Bilinear sampling at fractional positions, written with ``gather`` so it can be differentiated twice.

It computes what ``F.grid_sample(..., mode="bilinear", align_corners=False)`` computes. Why not
call that: PyTorch long had no derivative for grid_sample's backward pass (pytorch/pytorch#34704),
so a method that differentiates a gradient (Rep-MTL's saliency term, Auto-λ's and MOML's look-ahead)
stops with a RuntimeError. We saw torch 2.11 raise it on the CPU and on CUDA; the 2.13.0 CPU
build on our machine has the derivative, but the project accepts torch from 2.2. Made of
gathers, products and sums, this sampler has every derivative on every device and version.
"""

from __future__ import annotations

from torch import Tensor

PADDING_MODES = ("zeros", "border")


def grid_sample(features: Tensor, grid: Tensor, padding_mode: str = "zeros") -> Tensor:
    """``(N, C, H, W)`` features read at ``grid`` ``(N, Ho, Wo, 2)`` -> ``(N, C, Ho, Wo)``.

    ``grid[..., 0]`` is x (columns) and ``grid[..., 1]`` is y (rows), in [-1, 1] from the outer
    edge of the first pixel to the outer edge of the last (align_corners=False), so the pixel
    position is ``((x + 1) W - 1) / 2`` and column i's centre is at x = (2i + 1) / W - 1. Each
    output mixes the four pixels around that position with weights (1 - fx)(1 - fy), fx(1 - fy),
    (1 - fx)fy and fx fy. ``"zeros"``: pixels outside the image read 0. ``"border"``: the
    position is first clamped into the image, and a neighbour past the edge reads the edge pixel.
    Like ``F.grid_sample``, it wants features and grid of one dtype and batch size.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if grid.dtype != features.dtype or grid.shape[0] != features.shape[0] or grid.shape[-1] != 2:
        raise ValueError(f"grid must be (N, Ho, Wo, 2) of the features' dtype and batch size: features "
                         f"{tuple(features.shape)} {features.dtype}, grid {tuple(grid.shape)} {grid.dtype}")
    n, c, height, width = features.shape
    px = ((grid[..., 0] + 1) * width - 1) / 2
    py = ((grid[..., 1] + 1) * height - 1) / 2
    if padding_mode == "border":
        px, py = px.clamp(0, width - 1), py.clamp(0, height - 1)
    left, top = px.floor(), py.floor()  # floor has zero derivative
    fx, fy = px - left, py - top  # the weights of the right and the lower neighbours
    flat = features.flatten(2)
    out = features.new_zeros(n, c, *grid.shape[1:3])
    for column, wx in ((left, 1 - fx), (left + 1, fx)):
        for row, wy in ((top, 1 - fy), (top + 1, fy)):
            # Indices in integers: a half-precision grid holds whole numbers exactly only up to
            # 2048 (float16) or 256 (bfloat16). A NaN position (a diverging model's boxes) reads
            # pixel 0 with a NaN weight, so the output is NaN and no index is out of range.
            index = (as_index(row, height) * width + as_index(column, width)).flatten(1)
            pixels = flat.gather(2, index[:, None].expand(n, c, -1)).view_as(out)
            weight = wx * wy
            if padding_mode == "zeros":  # border: a clamped index already repeats the edge pixel
                weight = weight * ((column >= 0) & (column <= width - 1) & (row >= 0) & (row <= height - 1))
            out = out + pixels * weight[:, None]
    return out


def as_index(position: Tensor, size: int) -> Tensor:
    """Whole-number positions as int64 indices clamped into 0..size - 1; NaN becomes 0."""
    return position.nan_to_num(0).clamp(0, size - 1).long()
