"""A ViT-V-Net style hybrid for 2D and 3D: conv encoder, transformer, conv decoder with skips."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from csc.models.layers import (
    NORMS,
    UpBlock,
    check_choice,
    check_positive,
    divisibility_error,
    double_conv,
    layers_for,
    spatial_shape,
)


class ViTVNet(nn.Module):
    """Conv encoder, transformer over patch tokens, conv decoder back to full resolution.

    The encoder has a double conv per entry of ``encoder_channels`` with a 2x max-pooling between
    them; the deepest feature map is cut into ``patch_size``-wide patches, one token each, with a
    learned position embedding per patch, so the input shape is fixed: ``img_size``. Its length, 2
    or 3, is the dimension; a singleton axis is dropped ((1, 128, 128) builds a 2D model). The
    decoder undoes the patching with a transposed conv, then goes up level by level with the
    encoder's skips. Output (B, out_channels, *img_size), raw logits.
    """

    def __init__(
        self,
        out_channels: int,
        *,
        img_size: Sequence[int] = (128, 128, 128),
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (16, 32, 64),
        patch_size: int = 4,
        hidden_size: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        dropout: float = 0.1,
        norm: str | None = "batch",
    ) -> None:
        super().__init__()
        # A 2D patch may come as (1, Y, X); the data pipeline delivers it as (B, C, Y, X).
        self.img_size = spatial_shape(img_size, 2) if 1 in img_size else tuple(map(int, img_size))
        self.ndim = len(self.img_size)
        self.num_downsamplings, self.patch_size = len(encoder_channels) - 1, patch_size
        self._check(out_channels, in_channels, encoder_channels, hidden_size, num_heads, norm)
        check_positive(num_layers=num_layers, mlp_dim=mlp_dim)
        layers = layers_for(self.ndim)
        widths = list(encoder_channels)
        self.encoders = nn.ModuleList(
            double_conv(self.ndim, narrow, wide, norm=norm)
            for narrow, wide in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.pool = layers.max_pool(2)
        self.grid = tuple(size // self.divisor for size in self.img_size)  # patches per axis
        self.embed = layers.conv(widths[-1], hidden_size, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, math.prod(self.grid), hidden_size))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.transformer = self._transformer(hidden_size, num_layers, num_heads, mlp_dim, dropout)
        self.unembed = layers.conv_transpose(hidden_size, widths[-1], patch_size, stride=patch_size)
        self.fuse = double_conv(self.ndim, 2 * widths[-1], widths[-1], norm=norm)
        self.decoders = nn.ModuleList(
            UpBlock(self.ndim, wide, narrow, norm=norm, upsample="transposed")
            for narrow, wide in reversed(list(itertools.pairwise(widths)))
        )
        self.head = layers.conv(widths[0], out_channels, kernel_size=1)

    def _check(
        self,
        out_channels: int,
        in_channels: int,
        encoder_channels: Sequence[int],
        hidden_size: int,
        num_heads: int,
        norm: str | None,
    ) -> None:
        """Raise ValueError for arguments that cannot build a model."""
        check_positive(
            out_channels=out_channels, in_channels=in_channels, patch_size=self.patch_size
        )
        check_positive(hidden_size=hidden_size, num_heads=num_heads)
        if not encoder_channels:
            raise ValueError("encoder_channels must name at least one width")
        check_positive(**{f"encoder_channels[{i}]": c for i, c in enumerate(encoder_channels)})
        check_choice("norm", norm, NORMS)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if self.ndim not in (2, 3):
            raise ValueError(f"img_size must have 2 or 3 axes, got {self.img_size}")
        error = divisibility_error(self.img_size, self.divisor, f"ViTVNet ({self.divisor_reason})")
        if error:
            raise ValueError(error.replace("input shape", "img_size", 1))

    @staticmethod
    def _transformer(
        hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int, dropout: float
    ) -> nn.TransformerEncoder:
        """Pre-norm transformer encoder on (B, N, hidden) tokens."""
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            mlp_dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only apply to padded batches, and warn with norm_first: off.
        return nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(hidden_size), enable_nested_tensor=False
        )

    @property
    def divisor(self) -> int:
        """Every spatial size of ``img_size`` must be a multiple of this."""
        return 2**self.num_downsamplings * self.patch_size

    @property
    def divisor_reason(self) -> str:
        return f"{self.num_downsamplings} downsamplings and patch_size {self.patch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, *img_size)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViTVNet was built for img_size {self.img_size}, got input of spatial shape "
                f"{tuple(x.shape[2:])}"
            )
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)  # (B, C, *img_size / 2**level)
            x = encoder(x)
            skips.append(x)
        deepest = skips.pop()  # (B, C_deepest, *img_size / 2**num_downsamplings)
        x = torch.cat([deepest, self._attend(deepest)], dim=1)  # (B, 2 * C_deepest, ...)
        x = self.fuse(x)  # (B, C_deepest, ...)
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)  # (B, out_channels, *img_size)

    def _attend(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens from patches of ``features``, the transformer, and back to a feature map."""
        tokens = self.embed(features)  # (B, hidden, *grid)
        batch, hidden = tokens.shape[:2]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, hidden), N = prod(grid)
        tokens = self.transformer(self.dropout(tokens + self.position))
        tokens = tokens.transpose(1, 2).reshape(batch, hidden, *self.grid)  # (B, hidden, *grid)
        return self.unembed(tokens)  # (B, C_deepest, *deepest spatial)
