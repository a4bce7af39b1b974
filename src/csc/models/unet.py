"""A U-Net for 2D and 3D, plus the CellMap challenge toolkit's `UNet_2D` and `UNet_3D` names.

The module names give the toolkit's state_dict keys (``inc``, ``down1.maxpool_conv.1``,
``up1.up``, ``up1.conv``, ``outc.conv``), so its checkpoints load into `UNet_2D`/`UNet_3D`
and theirs into its tools.
"""

from __future__ import annotations

import torch
from torch import nn

from csc.models.layers import (
    NORMS,
    Checkpointable,
    DoubleConv,
    Down,
    OutputConv,
    Up,
    check_choice,
    check_positive,
)


class UNet(Checkpointable):
    """U-Net: double convs, ``num_levels`` 2x max-poolings down, as many upsamplings back.

    The width doubles (``channel_multiplier``) at each pooling, starting from ``base_channels``.
    Input (B, in_channels, *spatial); output (B, out_channels, *spatial), raw logits.
    ``upsample`` is "transposed" (learned 2x transposed conv) or "linear" (bi/trilinear
    interpolation; the deepest level then keeps the width below it, and each decoder level
    ends at the next level's width, as the toolkit's ``trilinear=True``). An upsampled map
    smaller than its skip (odd sizes) is zero-padded to it; csc's shape check still asks for
    multiples of ``divisor`` unless ``pads_odd_sizes`` (the toolkit's classes).
    """

    pads_odd_sizes = False  # True: `check_input_shape` asks only for sizes >= divisor

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
        check_choice("upsample", upsample, ("transposed", "linear"))
        self.ndim, self.num_levels = ndim, num_levels
        widths = [base_channels * channel_multiplier**level for level in range(num_levels + 1)]
        self.inc = DoubleConv(ndim, in_channels, widths[0], norm=norm)
        linear = upsample == "linear"
        for level in range(1, num_levels + 1):
            out = widths[level - 1] if linear and level == num_levels else widths[level]
            self.add_module(f"down{level}", Down(ndim, widths[level - 1], out, norm=norm))
        for step in range(1, num_levels + 1):
            level = num_levels - step  # the level of the skip this block joins
            below = widths[max(level - 1, 0)]
            up = Up(
                ndim,
                widths[level] if linear else widths[level + 1],
                widths[level],
                below if linear else widths[level],
                norm=norm,
                upsample=upsample,
                mid_channels=widths[level] if linear else None,
            )
            self.add_module(f"up{step}", up)
        self.outc = OutputConv(ndim, widths[0], out_channels)

    @property
    def divisor(self) -> int:
        """Every spatial size of the input should be a multiple of this."""
        return 2**self.num_levels

    @property
    def divisor_reason(self) -> str:
        return f"{self.num_levels} poolings"

    def blocks(self, kind: str) -> list[nn.Module]:
        """The ``down`` or ``up`` blocks, in the order the forward pass runs them."""
        return [self.get_submodule(f"{kind}{i}") for i in range(1, self.num_levels + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, *spatial)
        skips = [self.run_block(self.inc, x)]
        for down in self.blocks("down"):
            skips.append(self.run_block(down, skips[-1]))  # (B, C, *spatial // 2**level)
        x = skips.pop()  # the deepest level's output
        for up in self.blocks("up"):
            x = self.run_block(up, x, skips.pop())
        return self.outc(x)  # (B, out_channels, *spatial)


class _ToolkitUNet(UNet):
    """The toolkit's U-Net: 4 poolings, 64 to 1024 channels, batch norm, odd sizes padded.
    ``trilinear=True`` upsamples by interpolation instead of transposed convs."""

    ndim_of_class = 2
    pads_odd_sizes = True

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
