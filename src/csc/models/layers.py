"""Building blocks shared by the architectures, each written once for 2D and 3D.

`layers_for(ndim)` is the only place that picks a ``Conv2d`` or a ``Conv3d``; everything else
takes ``ndim`` and asks it. Tensors are (B, C, Y, X) for ndim 2 and (B, C, Z, Y, X) for ndim 3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

NORMS = ("batch", "instance", "group", None)
UPSAMPLES = ("transposed", "linear")
MAX_GROUPS = 8  # group norm: 8 groups, fewer when the channel count is not a multiple of 8
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]  # torch's conv padding_mode


@dataclasses.dataclass(frozen=True)
class Layers:
    """The torch layer classes for one spatial dimension."""

    conv: type[nn.Conv2d] | type[nn.Conv3d]
    conv_transpose: type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]
    max_pool: type[nn.MaxPool2d] | type[nn.MaxPool3d]
    batch_norm: type[nn.BatchNorm2d] | type[nn.BatchNorm3d]
    instance_norm: type[nn.InstanceNorm2d] | type[nn.InstanceNorm3d]
    interpolation: str  # mode for torch.nn.Upsample


LAYERS = {
    2: Layers(
        nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d, nn.InstanceNorm2d, "bilinear"
    ),
    3: Layers(
        nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d, nn.InstanceNorm3d, "trilinear"
    ),
}


def layers_for(ndim: int) -> Layers:
    """The layer classes for ``ndim`` spatial dimensions (2 or 3)."""
    if ndim not in LAYERS:
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    return LAYERS[ndim]


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(**values: int) -> None:
    """Raise ValueError for the first argument that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_norm(norm: str | None, ndim: int, num_channels: int) -> nn.Module:
    """A normalization layer over ``num_channels`` channels; ``None`` gives identity."""
    check_choice("norm", norm, NORMS)
    layers = layers_for(ndim)
    if norm == "batch":
        return layers.batch_norm(num_channels)
    if norm == "instance":
        return layers.instance_norm(num_channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, num_channels), num_channels)
    return nn.Identity()


def conv_norm_act(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    norm: str | None,
    kernel_size: int = 3,
    stride: int = 1,
    padding_mode: PaddingMode = "zeros",
) -> nn.Sequential:
    """Conv (same padding for stride 1), norm, ReLU. The conv has a bias only without norm."""
    conv = layers_for(ndim).conv(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        padding_mode=padding_mode,
        bias=norm is None,
    )
    return nn.Sequential(conv, make_norm(norm, ndim, out_channels), nn.ReLU(inplace=True))


def double_conv(ndim: int, in_channels: int, out_channels: int, *, norm: str | None) -> nn.Module:
    """Two 3-wide conv-norm-ReLU layers; the spatial shape is kept."""
    return nn.Sequential(
        conv_norm_act(ndim, in_channels, out_channels, norm=norm),
        conv_norm_act(ndim, out_channels, out_channels, norm=norm),
    )


def upsample_by_2(ndim: int, in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """Double the spatial shape: a transposed conv, or linear interpolation then a 1-wide conv."""
    check_choice("upsample", upsample, UPSAMPLES)
    layers = layers_for(ndim)
    if upsample == "transposed":
        return layers.conv_transpose(in_channels, out_channels, kernel_size=2, stride=2)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode=layers.interpolation, align_corners=False),
        layers.conv(in_channels, out_channels, kernel_size=1),
    )


class UpBlock(nn.Module):
    """Upsample by 2, concatenate the encoder's skip tensor, then a double conv."""

    def __init__(
        self, ndim: int, in_channels: int, out_channels: int, *, norm: str | None, upsample: str
    ) -> None:
        super().__init__()
        self.up = upsample_by_2(ndim, in_channels, out_channels, upsample)
        self.conv = double_conv(ndim, 2 * out_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, out, *2 * spatial), the skip's shape
        x = torch.cat([skip, x], dim=1)  # (B, 2 * out, *spatial)
        return self.conv(x)


def spatial_shape(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``shape`` with singleton axes dropped (first ones first) until it has ``ndim`` axes.

    A 2D patch of shape (1, 128, 128) reaches a 2D model as (128, 128).
    """
    axes = [int(size) for size in shape]
    while len(axes) > ndim and 1 in axes:
        axes.remove(1)
    return tuple(axes)


def divisibility_error(shape: tuple[int, ...], divisor: int, model: str) -> str | None:
    """Why ``shape`` is not a whole multiple of ``divisor`` on every axis, with the nearest
    shapes that are; None when it is."""
    if all(size % divisor == 0 and size > 0 for size in shape):
        return None
    lower = tuple(size // divisor * divisor for size in shape)
    upper = tuple(
        low if low == size else low + divisor for low, size in zip(lower, shape, strict=True)
    )
    options = [candidate for candidate in (lower, upper) if min(candidate) > 0]
    suggestion = " or ".join(str(candidate) for candidate in dict.fromkeys(options))
    return f"input shape {shape} is not divisible by {divisor} for {model}; try {suggestion}"
