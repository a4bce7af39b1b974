"""A pix2pix/CycleGAN-style residual generator for 2D and 3D, plus the CellMap challenge
toolkit's `ResNet` name and arguments.

All layers sit in one flat Sequential, ``model``, in the toolkit's order, so the state_dict
keys are its keys (``model.1``, ``model.10.conv_block.1``, ...).
"""

from __future__ import annotations

import itertools
from typing import Any, Literal, get_args

import torch
from torch import nn

from csc.models.layers import (
    ACTIVATIONS,
    NORMS,
    Checkpointable,
    check_choice,
    check_positive,
    conv_bias,
    layers_for,
    make_activation,
    make_norm,
)

PaddingType = Literal["reflect", "replicate", "zeros"]  # the toolkit's names
PADDING_TYPES: tuple[PaddingType, ...] = get_args(PaddingType)
DROPOUT = 0.2  # in each residual block when use_dropout is set, as in the toolkit


def padded_conv(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    padding_type: PaddingType,
    bias: bool,
) -> list[nn.Module]:
    """A stride-1 conv that keeps the shape: a reflect/replicate pad layer and an unpadded
    conv, or ("zeros") the conv's own zero padding."""
    layers, margin = layers_for(ndim), kernel_size // 2
    if padding_type == "zeros":
        return [layers.conv(in_channels, out_channels, kernel_size, padding=margin, bias=bias)]
    pad = layers.reflection_pad if padding_type == "reflect" else layers.replication_pad
    return [pad(margin), layers.conv(in_channels, out_channels, kernel_size, bias=bias)]


class ResidualBlock(nn.Module):
    """x + conv_block(x), conv_block = [pad] conv, norm, act, [dropout], [pad] conv, norm;
    channels and shape kept."""

    def __init__(
        self,
        ndim: int,
        channels: int,
        *,
        norm: str | None,
        use_dropout: bool,
        padding_type: PaddingType,
        activation: str,
    ) -> None:
        super().__init__()
        options: dict[str, Any] = {"padding_type": padding_type, "bias": conv_bias(norm)}
        self.conv_block = nn.Sequential(
            *padded_conv(ndim, channels, channels, 3, **options),
            make_norm(norm, ndim, channels),
            make_activation(activation),
            *([nn.Dropout(DROPOUT)] if use_dropout else []),
            *padded_conv(ndim, channels, channels, 3, **options),
            make_norm(norm, ndim, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResidualNet(Checkpointable):
    """Residual generator: a 7-wide stem conv, ``n_downsampling`` stride-2 convs (each doubling
    the width from ``ngf``), ``n_blocks`` residual blocks, as many 2x transposed convs back and a
    7-wide conv to ``out_channels`` channels.

    Input (B, in_channels, *spatial) with ``ndim`` 2 or 3 spatial axes, each a multiple of
    ``divisor``; output (B, out_channels, *spatial), raw logits (no tanh). ``padding_type`` is
    how the stride-1 convs keep the shape: "reflect", "replicate" (pad layers) or "zeros".
    Convs have a bias unless the norm learns a shift ("batch", "group").
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        *,
        ngf: int = 64,
        n_blocks: int = 6,
        n_downsampling: int = 2,
        norm: str | None = "instance",
        use_dropout: bool = False,
        padding_type: PaddingType = "reflect",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels, ngf=ngf)
        for name, count in (("n_blocks", n_blocks), ("n_downsampling", n_downsampling)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {count!r}")
        check_choice("norm", norm, NORMS)
        check_choice("padding_type", padding_type, PADDING_TYPES)
        check_choice("activation", activation, list(ACTIVATIONS))
        self.ndim, self.ngf, self.n_downsampling = ndim, ngf, n_downsampling
        self.norm, self.activation = norm, activation
        widths = [ngf * 2**level for level in range(n_downsampling + 1)]
        pairs = list(itertools.pairwise(widths))
        stem = padded_conv(
            ndim, in_channels, ngf, 7, padding_type=padding_type, bias=conv_bias(norm)
        )
        stem += [make_norm(norm, ndim, ngf), make_activation(activation)]
        downs = [
            layer for narrow, wide in pairs for layer in self._resample(narrow, wide, up=False)
        ]
        blocks = [
            ResidualBlock(
                ndim,
                widths[-1],
                norm=norm,
                use_dropout=use_dropout,
                padding_type=padding_type,
                activation=activation,
            )
            for _ in range(n_blocks)
        ]
        ups = [
            layer
            for narrow, wide in reversed(pairs)
            for layer in self._resample(wide, narrow, up=True)
        ]
        head = padded_conv(ndim, ngf, out_channels, 7, padding_type=padding_type, bias=True)
        self.model = nn.Sequential(*stem, *downs, *blocks, *ups, *head)
        # Where each block of `model` ends (stem, each resampling, each residual block, head):
        # the pieces that run_block checkpoints one at a time.
        sizes = [len(stem), *[3] * n_downsampling, *[1] * n_blocks, *[3] * n_downsampling]
        self.block_ends = tuple(itertools.accumulate([*sizes, len(head)]))

    def _resample(self, in_channels: int, out_channels: int, *, up: bool) -> list[nn.Module]:
        """A 3-wide stride-2 conv (down 2x) or transposed conv (``up``: exactly 2x the input),
        then norm and activation."""
        layers, bias = layers_for(self.ndim), conv_bias(self.norm)
        conv: nn.Module
        if not up:
            conv = layers.conv(in_channels, out_channels, 3, stride=2, padding=1, bias=bias)
        else:
            conv = layers.conv_transpose(
                in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=bias
            )
        norm = make_norm(self.norm, self.ndim, out_channels)
        return [conv, norm, make_activation(self.activation)]

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2**self.n_downsampling

    @property
    def divisor_reason(self) -> str:
        return f"{self.n_downsampling} downsamplings"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in_channels, *spatial) -> (B, out_channels, *spatial)
        start = 0
        for end in self.block_ends:
            x = self.run_block(self.model[start:end], x)  # a Sequential of the same layers
            start = end
        return x


def norm_name(norm_layer: Any) -> str:
    """csc's name for the toolkit's ``norm_layer`` class (BatchNorm or InstanceNorm)."""
    for name in ("batch", "instance"):
        if any(norm_layer is getattr(layers_for(n), f"{name}_norm") for n in (2, 3)):
            return name
    raise ValueError(
        f"norm_layer {norm_layer!r} is not one csc builds: pass torch.nn.BatchNorm2d/3d or "
        "InstanceNorm2d/3d, or csc's norm='group' / norm=None"
    )


def activation_name(activation: Any) -> str:
    """csc's name for the toolkit's ``activation`` class (torch.nn.ReLU, ...)."""
    for name, kind in ACTIVATIONS.items():
        if activation is kind:
            return name
    valid = ", ".join(f"torch.nn.{kind.__name__}" for kind in ACTIVATIONS.values())
    raise ValueError(f"activation {activation!r} is not one csc builds; use one of {valid}")


class ResNet(ResidualNet):
    """The CellMap challenge toolkit's name and arguments for `ResidualNet`.

    ``ndims``, ``input_nc`` and ``output_nc`` (None: ``ngf``, as the toolkit) are its
    ``ndim``, ``in_channels`` and ``out_channels``; ``norm_layer`` (a torch BatchNorm or
    InstanceNorm class) and ``activation`` (a torch activation class) map to csc's names;
    the other keyword arguments (``ngf``, ``n_blocks``, ``padding_type``, ...) pass through
    (``padding_type`` in any case; "same" is "reflect", as in the toolkit).
    """

    def __init__(
        self,
        ndims: int,
        input_nc: int = 1,
        output_nc: int | None = None,
        norm_layer: Any = None,
        activation: Any = nn.ReLU,
        **options: Any,
    ) -> None:
        if isinstance(options.get("padding_type"), str):  # the toolkit's: any case, "same"
            padding = options["padding_type"].lower()
            options["padding_type"] = "reflect" if padding == "same" else padding
        if options.get("padding_type") == "valid":
            raise ValueError(
                "padding_type='valid' shrinks the output below the input, which csc's "
                "training and prediction cannot use; use 'reflect', 'replicate' or 'zeros'"
            )
        if norm_layer is not None:
            options["norm"] = norm_name(norm_layer)
        ngf = options.get("ngf", 64)
        out = ngf if output_nc is None else output_nc
        super().__init__(ndims, input_nc, out, activation=activation_name(activation), **options)
        self.ndims, self.input_nc, self.output_nc = ndims, input_nc, out
