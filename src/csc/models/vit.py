"""ViT-V-Net for 2D and 3D: conv encoder, transformer over patch tokens, conv decoder with
skips; plus the CellMap challenge toolkit's `ViTVNet` name and arguments.

The module names give the toolkit's state_dict keys (``transformer.embeddings.hybrid_model``,
``transformer.encoder.layer.0.attn.query``, ``decoder.conv_more``, ``decoder.blocks.0.conv1``,
``reg_head.0``), so `ViTVNet` and the toolkit's class read each other's checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from csc.models.layers import (
    NORMS,
    Checkpointable,
    DoubleConv,
    Down,
    check_choice,
    check_positive,
    conv_norm_act,
    divisibility_error,
    layers_for,
    spatial_shape,
)

LAYER_NORM_EPS = 1e-6
# The toolkit's one named config, "ViT-V-Net" (its get_3DReg_config), as csc's arguments.
VIT_V_NET: dict[str, Any] = {
    "hidden_size": 252,
    "mlp_dim": 3072,
    "num_heads": 12,
    "num_layers": 12,
    "attention_dropout": 0.0,
    "dropout": 0.1,
    "patch_size": 8,
    "bridge_channels": 512,  # its conv_first_channel
    "encoder_channels": (16, 32, 32),
    "decoder_channels": (96, 48, 32, 32, 16),
    "in_channels": 1,  # its input_channels
}


class CNNEncoder(Checkpointable):
    """Double convs without norm (``inc``, ``down1``...), 2x max-pooling between them; then
    ``num_pools`` more poolings of the deepest map. Returns the deepest map and the skips,
    deepest first."""

    def __init__(
        self, ndim: int, in_channels: int, widths: Sequence[int], *, num_pools: int
    ) -> None:
        super().__init__()
        self.num_levels, self.num_pools = len(widths) - 1, num_pools
        self.inc = DoubleConv(ndim, in_channels, widths[0], norm=None)
        for level in range(1, len(widths)):
            self.add_module(f"down{level}", Down(ndim, widths[level - 1], widths[level], norm=None))
        self.pool = layers_for(ndim).max_pool(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = [self.run_block(self.inc, x)]  # (B, widths[0], *spatial)
        for level in range(1, self.num_levels + 1):
            features.append(self.run_block(self.get_submodule(f"down{level}"), features[-1]))
        deepest = features[-1]  # (B, widths[-1], *spatial / 2**num_levels)
        for _ in range(self.num_pools):
            features.append(self.pool(features[-1]))
        return deepest, features[::-1]


class PatchEmbeddings(nn.Module):
    """The encoder (``hybrid_model``), then one token per patch of its deepest map
    (``patch_embeddings``) plus a learned position embedding each, zero at the start."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        widths: Sequence[int],
        *,
        patch_size: int,
        hidden_size: int,
        num_patches: int,
        dropout: float,
    ) -> None:
        super().__init__()
        num_pools = int(math.log2(patch_size)) - 1
        self.hybrid_model = CNNEncoder(ndim, in_channels, widths, num_pools=num_pools)
        conv = layers_for(ndim).conv
        self.patch_embeddings = conv(widths[-1], hidden_size, patch_size, stride=patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        deepest, skips = self.hybrid_model(x)
        tokens = self.patch_embeddings(deepest)  # (B, hidden, *grid)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, hidden), N = prod(grid)
        return self.dropout(tokens + self.position_embeddings), skips


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``, ``key``, ``value`` and ``out``
    projections. With ``vis``, the last attention probabilities stay in ``weights``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, vis: bool) -> None:
        super().__init__()
        self.num_heads, self.vis = num_heads, vis
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.proj_dropout = nn.Dropout(dropout)
        self.softmax = nn.Softmax(dim=-1)
        self.weights: torch.Tensor | None = None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        # (B, N, hidden) -> (B, heads, N, hidden / heads)
        return x.view(batch, tokens, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (
            self.heads(self.query(x)),
            self.heads(self.key(x)),
            self.heads(self.value(x)),
        )
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # (B, heads, N, N)
        probabilities = self.softmax(scores)
        self.weights = probabilities if self.vis else None
        context = self.attn_dropout(probabilities) @ value  # (B, heads, N, hidden / heads)
        context = context.transpose(1, 2).flatten(2)  # (B, N, hidden)
        return self.proj_dropout(self.out(context))


class FeedForward(nn.Module):
    """fc1, exact GELU, dropout, fc2, dropout; Xavier-uniform weights, biases ~ N(0, 1e-6)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden_size, mlp_dim), nn.Linear(mlp_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(functional.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(attention_norm(x)), then x + ffn(ffn_norm(x))."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_dim: int,
        *,
        dropout: float,
        attention_dropout: float,
        vis: bool,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(hidden_size, mlp_dim, dropout)
        self.attn = SelfAttention(hidden_size, num_heads, attention_dropout, vis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class TransformerEncoder(Checkpointable):
    """``layer``: the blocks; ``encoder_norm``: a LayerNorm after the last."""

    def __init__(self, hidden_size: int, num_layers: int, **block: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            TransformerBlock(hidden_size, **block) for _ in range(num_layers)
        )
        self.encoder_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = self.run_block(block, x)
        return self.encoder_norm(x)


class Transformer(nn.Module):
    """``embeddings`` (encoder and tokens) and ``encoder`` (the transformer blocks)."""

    def __init__(self, embeddings: PatchEmbeddings, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.embeddings, self.encoder = embeddings, encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, skips = self.embeddings(x)
        return self.encoder(tokens), skips  # (B, N, hidden), skips deepest first


class DecoderBlock(nn.Module):
    """Upsample 2x (``up``, linear), concatenate [x, skip], two conv-norm-ReLUs."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        norm: str | None,
    ) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(ndim, in_channels + skip_channels, out_channels, norm=norm)
        self.conv2 = conv_norm_act(ndim, out_channels, out_channels, norm=norm)
        mode = layers_for(ndim).interpolation
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip], dim=1)  # (B, in + skip, *skip spatial)
        return self.conv2(self.conv1(x))


class Decoder(Checkpointable):
    """Tokens back to a map on the patch grid, ``conv_more`` to ``bridge_channels``, then one
    `DecoderBlock` per skip (``blocks``)."""

    def __init__(
        self,
        ndim: int,
        hidden_size: int,
        bridge_channels: int,
        skip_channels: Sequence[int],
        decoder_channels: Sequence[int],
        *,
        grid: tuple[int, ...],
        norm: str | None,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.conv_more = conv_norm_act(ndim, hidden_size, bridge_channels, norm=norm)
        inputs = [bridge_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(ndim, narrow, skip, out, norm=norm)
            for narrow, skip, out in zip(inputs, skip_channels, decoder_channels, strict=True)
        )

    def forward(self, tokens: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, _, hidden = tokens.shape
        x = tokens.transpose(1, 2).reshape(batch, hidden, *self.grid)  # (B, hidden, *grid)
        x = self.run_block(self.conv_more, x)
        for block, skip in zip(self.blocks, skips, strict=True):
            x = self.run_block(block, x, skip)
        return x  # (B, decoder_channels[-1], *img_size)


class ViTNet(Checkpointable):
    """ViT-V-Net: conv encoder, transformer over patch tokens, conv decoder with every skip.

    The encoder has a double conv (no norm) per entry of ``encoder_channels`` with a 2x
    max-pooling between them; the deepest map is cut into ``patch_size``-wide patches (a power
    of 2), one token each, with a learned position embedding per patch, so the input shape is
    fixed: ``img_size``. Its length, 2 or 3, is the dimension; a singleton axis is dropped
    ((1, 128, 128) builds a 2D model). The decoder goes from the patch grid back up 2x at a
    time, one block per skip: the deepest map pooled ``log2(patch_size) - 1`` times, then each
    encoder level. ``decoder_channels`` (None: the skips' widths) are the blocks' widths,
    ``bridge_channels`` (None: ``hidden_size``) the width before them; ``norm`` is the
    decoder's. Output (B, out_channels, *img_size), raw logits.
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
        attention_dropout: float = 0.0,
        decoder_channels: Sequence[int] | None = None,
        bridge_channels: int | None = None,
        norm: str | None = "batch",
        vis: bool = False,
    ) -> None:
        super().__init__()
        # A 2D patch may come as (1, Y, X); the data pipeline delivers it as (B, C, Y, X).
        self.img_size = spatial_shape(img_size, 2) if 1 in img_size else tuple(map(int, img_size))
        self.ndim = len(self.img_size)
        self.num_downsamplings, self.patch_size = len(encoder_channels) - 1, patch_size
        self._check(out_channels, in_channels, encoder_channels, hidden_size, num_heads, norm)
        check_positive(num_layers=num_layers, mlp_dim=mlp_dim)
        widths = list(encoder_channels)
        skip_channels = [widths[-1]] * (int(math.log2(patch_size)) - 1) + widths[::-1]
        decoder = list(skip_channels if decoder_channels is None else decoder_channels)
        if len(decoder) != len(skip_channels):
            raise ValueError(
                f"decoder_channels needs {len(skip_channels)} widths (one per skip) for "
                f"encoder_channels {tuple(widths)} and patch_size {patch_size}; got {decoder}"
            )
        grid = tuple(size // self.divisor for size in self.img_size)  # patches per axis
        embeddings = PatchEmbeddings(
            self.ndim,
            in_channels,
            widths,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_patches=math.prod(grid),
            dropout=dropout,
        )
        encoder = TransformerEncoder(
            hidden_size,
            num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            vis=vis,
        )
        self.transformer = Transformer(embeddings, encoder)
        bridge = hidden_size if bridge_channels is None else bridge_channels
        self.decoder = Decoder(
            self.ndim, hidden_size, bridge, skip_channels, decoder, grid=grid, norm=norm
        )
        head = layers_for(self.ndim).conv(decoder[-1], out_channels, 3, padding=1)
        nn.init.normal_(head.weight, std=1e-5)  # the toolkit's: logits start near 0
        if head.bias is not None:  # always: the conv is built with a bias
            nn.init.zeros_(head.bias)
        self.reg_head = nn.Sequential(head)

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
        if self.patch_size & (self.patch_size - 1) or self.patch_size < 2:
            raise ValueError(f"patch_size must be a power of 2 from 2 up, got {self.patch_size}")
        if not encoder_channels:
            raise ValueError("encoder_channels must name at least one width")
        check_positive(**{f"encoder_channels[{i}]": c for i, c in enumerate(encoder_channels)})
        check_choice("norm", norm, NORMS)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if self.ndim not in (2, 3):
            raise ValueError(f"img_size must have 2 or 3 axes, got {self.img_size}")
        error = divisibility_error(
            self.img_size, self.divisor, f"{type(self).__name__} ({self.divisor_reason})"
        )
        if error:
            raise ValueError(error.replace("input shape", "img_size", 1))

    @property
    def divisor(self) -> int:
        """Every spatial size of ``img_size`` must be a multiple of this."""
        return 2**self.num_downsamplings * self.patch_size

    @property
    def divisor_reason(self) -> str:
        return f"{self.num_downsamplings} downsamplings and patch_size {self.patch_size}"

    @property
    def attention_weights(self) -> list[torch.Tensor]:
        """Each block's last attention probabilities (B, heads, N, N); built with ``vis``."""
        attentions = [block.get_submodule("attn") for block in self.transformer.encoder.layer]
        weights = [getattr(attention, "weights", None) for attention in attentions]
        return [w for w in weights if isinstance(w, torch.Tensor)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, *img_size)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"{type(self).__name__} was built for img_size {self.img_size}, got input of "
                f"spatial shape {tuple(x.shape[2:])}"
            )
        tokens, skips = self.transformer(x)  # (B, N, hidden)
        return self.reg_head(self.decoder(tokens, skips))  # (B, out_channels, *img_size)


def vit_options(config: str | Mapping[str, Any] | Any) -> dict[str, Any]:
    """csc's `ViTNet` arguments for the toolkit's ``config``: its name "ViT-V-Net", or a
    config object or dict with the toolkit's fields (``hidden_size``, ``transformer.mlp_dim``,
    ``patches.size``, ...); ValueError for one csc cannot build."""
    if isinstance(config, str):
        if config != "ViT-V-Net":
            raise ValueError(f"unknown ViTVNet config {config!r}; available: ViT-V-Net")
        return dict(VIT_V_NET)

    def field(name: str) -> Any:
        value = config
        for part in name.split("."):
            value = value[part] if isinstance(value, Mapping) else getattr(value, part)
        return value

    patch = field("patches.size")
    patch_size = int(patch if isinstance(patch, int) else patch[0])
    options = {
        "hidden_size": field("hidden_size"),
        "mlp_dim": field("transformer.mlp_dim"),
        "num_heads": field("transformer.num_heads"),
        "num_layers": field("transformer.num_layers"),
        "attention_dropout": field("transformer.attention_dropout_rate"),
        "dropout": field("transformer.dropout_rate"),
        "patch_size": patch_size,
        "bridge_channels": field("conv_first_channel"),
        "encoder_channels": tuple(field("encoder_channels")),
        "decoder_channels": tuple(field("decoder_channels")),
        "in_channels": field("input_channels"),
    }
    _check_toolkit_layout(field, options)
    return options


def _check_toolkit_layout(field: Callable[[str], Any], options: Mapping[str, Any]) -> None:
    """ValueError unless the config's skips are the ones csc's `ViTNet` builds."""
    widths = list(options["encoder_channels"])
    num_pools = int(math.log2(options["patch_size"])) - 1
    expected = {
        "down_factor": len(widths) - 1,
        "down_num": num_pools,
        "skip_channels": (*[widths[-1]] * num_pools, *widths[::-1]),
        "n_skip": num_pools + len(widths),
    }
    for name, value in expected.items():
        given = field(name)
        if (tuple(given) if isinstance(given, Sequence) else given) != value:
            raise ValueError(
                f"ViTVNet config: {name} is {given!r}, but csc builds {value!r} for "
                f"encoder_channels {tuple(widths)} and patch size {options['patch_size']}"
            )


class ViTVNet(ViTNet):
    """The CellMap challenge toolkit's name and arguments for `ViTNet`: ``ViTVNet(out_channels,
    config="ViT-V-Net", img_size=(128, 128, 128), vis=False)``, positional as well; keyword
    ``options`` (csc's `ViTNet` arguments) override the config's values."""

    def __init__(
        self,
        out_channels: int,
        config: str | Mapping[str, Any] | Any = "ViT-V-Net",
        img_size: Sequence[int] = (128, 128, 128),
        vis: bool = False,
        **options: Any,
    ) -> None:
        arguments = vit_options(config) | options
        super().__init__(out_channels, img_size=img_size, vis=vis, **arguments)
        self.out_channels, self.vis = out_channels, vis
