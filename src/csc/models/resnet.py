"""A pix2pix-style residual generator for 2D and 3D, plus the CellMap challenge toolkit's
`ResNet` name and arguments."""

from __future__ import annotations

import itertools
from typing import Any, Literal, get_args

import torch
from torch import nn

from csc.models.layers import (
    NORMS,
    check_choice,
    check_positive,
    conv_norm_act,
    layers_for,
    make_norm,
)

PaddingType = Literal["reflect", "replicate", "zeros"]  # the toolkit's choices, torch's names
PADDING_TYPES: tuple[PaddingType, ...] = get_args(PaddingType)
DROPOUT = 0.2  # in each residual block when use_dropout is set, as in the toolkit


class ResidualBlock(nn.Module):
    """x + (conv, norm, ReLU, [dropout], conv, norm)(x); channels and shape kept."""

    def __init__(
        self,
        ndim: int,
        channels: int,
        *,
        norm: str | None,
        use_dropout: bool,
        padding_type: PaddingType,
    ) -> None:
        super().__init__()
        conv = layers_for(ndim).conv
        self.body = nn.Sequential(
            conv_norm_act(ndim, channels, channels, norm=norm, padding_mode=padding_type),
            nn.Dropout(DROPOUT) if use_dropout else nn.Identity(),
            conv(channels, channels, 3, padding=1, padding_mode=padding_type, bias=norm is None),
            make_norm(norm, ndim, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualNet(nn.Module):
    """Residual generator: a 7-wide stem conv, ``n_downsampling`` stride-2 convs (each doubling
    the width from ``ngf``), ``n_blocks`` residual blocks, as many 2x transposed convs back and a
    7-wide conv to ``out_channels`` channels.

    Input (B, in_channels, *spatial) with ``ndim`` 2 or 3 spatial axes, each a multiple of
    ``divisor``; output (B, out_channels, *spatial), raw logits (no tanh). ``padding_type`` is
    the padding of the stride-1 and downsampling convs: "reflect", "replicate" or "zeros".
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
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, out_channels=out_channels, ngf=ngf)
        for name, count in (("n_blocks", n_blocks), ("n_downsampling", n_downsampling)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {count!r}")
        check_choice("norm", norm, NORMS)
        check_choice("padding_type", padding_type, PADDING_TYPES)
        self.ndim, self.ngf, self.n_downsampling = ndim, ngf, n_downsampling
        widths = [ngf * 2**level for level in range(n_downsampling + 1)]
        stem = conv_norm_act(
            ndim, in_channels, ngf, kernel_size=7, norm=norm, padding_mode=padding_type
        )
        downs = [
            conv_norm_act(ndim, narrow, wide, stride=2, norm=norm, padding_mode=padding_type)
            for narrow, wide in itertools.pairwise(widths)
        ]
        blocks = [
            ResidualBlock(
                ndim, widths[-1], norm=norm, use_dropout=use_dropout, padding_type=padding_type
            )
            for _ in range(n_blocks)
        ]
        ups = [
            self._up(wide, narrow, norm)
            for narrow, wide in reversed(list(itertools.pairwise(widths)))
        ]
        head = layers_for(ndim).conv(ngf, out_channels, 7, padding=3, padding_mode=padding_type)
        self.model = nn.Sequential(stem, *downs, *blocks, *ups, head)

    def _up(self, in_channels: int, out_channels: int, norm: str | None) -> nn.Sequential:
        """2x transposed conv (3-wide, so output = 2 * input exactly), norm, ReLU."""
        conv = layers_for(self.ndim).conv_transpose(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=norm is None
        )
        return nn.Sequential(conv, make_norm(norm, self.ndim, out_channels), nn.ReLU(inplace=True))

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2**self.n_downsampling

    @property
    def divisor_reason(self) -> str:
        return f"{self.n_downsampling} downsamplings"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in_channels, *spatial) -> (B, out_channels, *spatial)
        return self.model(x)


class ResNet(ResidualNet):
    """The CellMap challenge toolkit's name and arguments for `ResidualNet`: ``ndims``,
    ``input_nc`` and ``output_nc`` are its ``ndim``, ``in_channels`` and ``out_channels``;
    ``options`` are its keyword arguments (``ngf``, ``n_blocks``, ``norm``, ...)."""

    def __init__(self, ndims: int, input_nc: int = 1, output_nc: int = 1, **options: Any) -> None:
        super().__init__(ndims, input_nc, output_nc, **options)
        self.ndims, self.input_nc, self.output_nc = ndims, input_nc, output_nc
