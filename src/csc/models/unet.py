"""A U-Net for 2D and 3D, plus the CellMap challenge toolkit's `UNet_2D` and `UNet_3D` names."""

from __future__ import annotations

import torch
from torch import nn

from csc.models.layers import (
    NORMS,
    UpBlock,
    check_choice,
    check_positive,
    double_conv,
    layers_for,
)


class UNet(nn.Module):
    """U-Net: double convs, ``num_levels`` 2x max-poolings down, as many upsamplings back.

    The width doubles (``channel_multiplier``) at each pooling, starting from ``base_channels``.
    Input (B, in_channels, *spatial) with every spatial size a multiple of ``divisor``; output
    (B, out_channels, *spatial), raw logits. ``upsample`` is "transposed" (learned 2x transposed
    conv) or "linear" (bi/trilinear interpolation then a 1-wide conv).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        *,
        base_channels: int = 32,
        num_levels: int = 4,
        channel_multiplier: int = 2,
        norm: str | None = "batch",
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            channel_multiplier=channel_multiplier,
        )
        if not isinstance(num_levels, int) or num_levels < 0:
            raise ValueError(f"num_levels must be an integer >= 0, got {num_levels!r}")
        check_choice("norm", norm, NORMS)
        layers = layers_for(ndim)
        self.ndim, self.num_levels = ndim, num_levels
        widths = [base_channels * channel_multiplier**level for level in range(num_levels + 1)]
        self.encoders = nn.ModuleList(
            double_conv(ndim, in_width, out_width, norm=norm)
            for in_width, out_width in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.pool = layers.max_pool(2)
        self.decoders = nn.ModuleList(
            UpBlock(ndim, widths[level + 1], widths[level], norm=norm, upsample=upsample)
            for level in reversed(range(num_levels))
        )
        self.head = layers.conv(widths[0], out_channels, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2**self.num_levels

    @property
    def divisor_reason(self) -> str:
        return f"{self.num_levels} poolings"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, *spatial)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)  # (B, C, *spatial / 2**level)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottleneck's output is x itself
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)  # (B, out_channels, *spatial)


class _ToolkitUNet(UNet):
    """The toolkit's U-Net: 4 poolings, 64 to 1024 channels, batch norm. ``trilinear=True``
    upsamples by interpolation instead of transposed convs."""

    ndim_of_class = 2

    def __init__(self, n_channels: int, n_classes: int, trilinear: bool = False) -> None:
        upsample = "linear" if trilinear else "transposed"
        super().__init__(
            self.ndim_of_class, n_channels, n_classes, base_channels=64, upsample=upsample
        )
        self.n_channels, self.n_classes, self.trilinear = n_channels, n_classes, trilinear


class UNet_2D(_ToolkitUNet):  # noqa: N801 (the CellMap challenge toolkit's name)
    """The toolkit's 2D U-Net (see `_ToolkitUNet`)."""

    ndim_of_class = 2


class UNet_3D(_ToolkitUNet):  # noqa: N801 (the CellMap challenge toolkit's name)
    """The toolkit's 3D U-Net (see `_ToolkitUNet`)."""

    ndim_of_class = 3
