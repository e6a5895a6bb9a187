"""Small encoders and heads shared by every architecture in this package.

The reference implementations are about *how tasks share*, not about backbones, so the
building blocks here are deliberately tiny: they train in seconds on a CPU. Any
``nn.Module`` can replace them; the architectures only need to know the width of the
features an encoder produces (``out_dim`` for vectors, ``out_channels`` for maps).

Both encoders keep their layers in ``self.blocks`` (an ``nn.ModuleList``) so that
architectures which mix information *between* layers (cross-stitch, sluice, NDDR) can
build one column per task from the same recipe and interleave their own units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``weight`` (out, in) applied over dimension 1 of ``x``: a linear map of vectors, a 1x1
    convolution of maps. Unlike an einsum, which keeps a permuted copy of ``x`` for the backward
    pass, these keep ``x`` itself: NDDR and MTL-NAS apply one such map per task to the same
    concatenation of every task's features, and 40 tasks kept 40 copies of it."""
    if x.ndim == 2:
        return F.linear(x, weight, bias)
    convolution = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(x.ndim)
    if convolution is None:
        y = torch.einsum("oc,bc...->bo...", weight, x)
        return y if bias is None else y + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return convolution(x, weight.view(*weight.shape, *([1] * (x.ndim - 2))), bias)


class ChannelLinear(nn.Module):
    """A linear map over dimension 1 of ``(B, C)`` or ``(B, C, H, W)`` (a 1x1 convolution).

    Architectures that mix features channel-wise (NDDR, MTAN's attention, sluice) use it so
    that the same code serves vector and image encoders.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default init

    def forward(self, x: Tensor) -> Tensor:
        return channel_linear(x, self.weight, self.bias)


def mlp_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """One fully connected layer followed by a ReLU."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())


def conv_block(
    in_channels: int, out_channels: int, kernel_size: int = 3, pool: bool = False
) -> nn.Sequential:
    """3x3 convolution (same padding) + ReLU, optionally followed by 2x2 max pooling."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Vector encoder: ``(B, in_dim) -> (B, out_dim)``, a ReLU after every layer.

    ``hidden_dims`` are the widths of the layers before the last; the last layer has
    width ``out_dim``. The output keeps its ReLU: it is a representation that heads read,
    not a prediction.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int):
        super().__init__()
        widths = [in_dim, *hidden_dims, out_dim]
        self.blocks = nn.ModuleList(mlp_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.widths: tuple[int, ...] = tuple(widths)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ConvEncoder(nn.Module):
    """Image encoder: ``(B, C, H, W) -> (B, channels[-1], H', W')`` feature maps.

    One :func:`conv_block` per entry of ``channels``. With ``pool=False`` (default) the
    spatial size is kept, so a dense head can predict per pixel at input resolution;
    with ``pool=True`` every block halves H and W.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        pool: bool = False,
    ):
        super().__init__()
        if not channels:
            raise ValueError("ConvEncoder needs at least one block (channels is empty)")
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            conv_block(a, b, kernel_size, pool) for a, b in zip(widths[:-1], widths[1:])
        )
        self.in_channels = in_channels
        self.out_channels = channels[-1]
        self.widths: tuple[int, ...] = tuple(widths)
        self.downsample = 2 ** len(channels) if pool else 1

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def mlp_head(in_dim: int, out_dim: int, hidden_dims: Sequence[int] = ()) -> nn.Sequential:
    """Task tower for vectors: optional hidden ReLU layers, then a linear output layer."""
    widths = [in_dim, *hidden_dims]
    layers: list[nn.Module] = [mlp_block(a, b) for a, b in zip(widths[:-1], widths[1:])]
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)


def conv_head(
    in_channels: int, out_channels: int, hidden_channels: int | None = None, upsample: int = 1
) -> nn.Sequential:
    """Dense per-pixel head: optional 3x3 conv + ReLU, then a 1x1 conv to ``out_channels``.

    ``upsample`` > 1 first resizes the feature map bilinearly (undoing an encoder's
    pooling) so the prediction has the label's resolution.
    """
    layers: list[nn.Module] = []
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    width = in_channels
    if hidden_channels is not None:
        layers += [nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.ReLU()]
        width = hidden_channels
    layers.append(nn.Conv2d(width, out_channels, 1))
    return nn.Sequential(*layers)


def pooled_head(in_channels: int, out_dim: int) -> nn.Sequential:
    """Image-level head: global average pooling, then a linear layer (classification)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, out_dim))


def image_head(in_channels: int, out_dim: int, dense: bool) -> nn.Module:
    """Head for image features: per-pixel 1x1 conv when ``dense``, else pooled linear."""
    return conv_head(in_channels, out_dim) if dense else pooled_head(in_channels, out_dim)


def trunk_for(input_shape: Sequence[int], width: int = 32, depth: int = 2) -> nn.Module:
    """A small default encoder for inputs of ``input_shape``: ``depth`` layers of ``width``.

    Vectors ``(d,)`` get an :class:`MLPEncoder`, images ``(C, H, W)`` a resolution-keeping
    :class:`ConvEncoder`. Every layer has the same width, which the architectures that mix
    layers or columns (sluice, cross-stitch, NDDR) rely on.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if len(input_shape) == 1:
        return MLPEncoder(input_shape[0], [width] * (depth - 1), width)
    if len(input_shape) == 3:
        return ConvEncoder(input_shape[0], (width,) * depth)
    raise ValueError(f"expected an input shape (d,) or (C, H, W), got {tuple(input_shape)}")


def head_for(input_shape: Sequence[int], in_width: int, out_dim: int, dense: bool) -> nn.Module:
    """The matching default head: linear for vectors, per-pixel for dense, pooled otherwise."""
    if len(input_shape) == 1:
        return mlp_head(in_width, out_dim)
    if dense:
        return conv_head(in_width, out_dim)
    return pooled_head(in_width, out_dim)


def heads_for(problem, in_width: int) -> dict[str, nn.Module]:
    """One default head per task of ``problem`` (a registry ``Problem``), each on ``in_width`` features."""
    return {t: head_for(problem.input_shape, in_width, problem.out_dims[t], problem.dense) for t in problem.tasks}


def backbone_layers(backbone: nn.Module, freeze: bool = False, purpose: str = "adapt") -> list[nn.Module]:
    """The backbone's nn.Linear and nn.Conv2d layers, the ones adapters, masks and LoRA wrap.

    Every model that wraps them runs the wrapped layers in turn with a ReLU after each, so the
    backbone must be exactly such a stack (what ``trunk_for`` builds): pooling, normalisation,
    dropout, or a convolution's dilation, groups or padding mode would be dropped without a
    word, and are refused instead. ``freeze`` stops the backbone's own parameters from
    training (a pre-trained model that stays fixed); ``purpose`` names what the caller does
    with the layers in the errors.
    """
    leaves = [(name, m) for name, m in backbone.named_modules() if next(m.children(), None) is None]
    layers = [m for _, m in leaves if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"the backbone has no nn.Linear or nn.Conv2d layer to {purpose}")
    rule = (f"to {purpose} its layers, the backbone must be nn.Linear/nn.Conv2d layers each followed by one "
            f"nn.ReLU (how the model runs them)")
    for i, (name, module) in enumerate(leaves):
        expected = (nn.Linear, nn.Conv2d) if i % 2 == 0 else nn.ReLU
        if not isinstance(module, expected):
            wanted = "a layer" if i % 2 == 0 else "an nn.ReLU"
            raise ValueError(f"{rule}; module '{name}' is {type(module).__name__} where {wanted} belongs")
        if isinstance(module, nn.Conv2d) and (
                module.dilation != (1, 1) or module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(f"{rule}, with dilation 1, groups 1 and zero padding; '{name}' has dilation "
                             f"{module.dilation}, groups {module.groups}, padding mode {module.padding_mode!r}")
    if len(leaves) % 2:
        raise ValueError(f"{rule}; the last layer, '{leaves[-1][0]}', has no nn.ReLU after it")
    if freeze:
        backbone.requires_grad_(False)
    return layers


def conv_geometry(layer: nn.Linear | nn.Conv2d) -> dict[str, object] | None:
    """What a wrapper needs to run ``layer``'s operation with other weights: None for a linear
    layer, the stride and padding for a convolution (``backbone_layers`` refuses the rest)."""
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding}
    return None


def run_layer(geometry: dict[str, object] | None, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The wrapped layer's operation on ``x`` with ``weight`` and ``bias``; ``geometry`` is
    :func:`conv_geometry` of that layer."""
    if geometry is None:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, **geometry)
