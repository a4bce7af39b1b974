"""Building blocks shared by the architectures, each written once for 2D and 3D.

`layers_for(ndim)` is the only place that picks a ``Conv2d`` or a ``Conv3d``; everything else
takes ``ndim`` and asks it. Tensors are (B, C, Y, X) for ndim 2 and (B, C, Z, Y, X) for ndim 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

NORMS = ("batch", "instance", "group", None)
UPSAMPLES = ("transposed", "linear")
MAX_GROUPS = 8  # group norm: 8 groups, fewer when the channel count is not a multiple of 8


@dataclasses.dataclass(frozen=True)
class Layers:
    """The torch layer classes for one spatial dimension."""

    conv: type[nn.Conv2d] | type[nn.Conv3d]
    conv_transpose: type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]
    max_pool: type[nn.MaxPool2d] | type[nn.MaxPool3d]
    batch_norm: type[nn.BatchNorm2d] | type[nn.BatchNorm3d]
    instance_norm: type[nn.InstanceNorm2d] | type[nn.InstanceNorm3d]
    reflection_pad: type[nn.ReflectionPad2d] | type[nn.ReflectionPad3d]
    replication_pad: type[nn.ReplicationPad2d] | type[nn.ReplicationPad3d]
    interpolation: str  # mode for torch.nn.Upsample


LAYERS = {
    2: Layers(
        nn.Conv2d,
        nn.ConvTranspose2d,
        nn.MaxPool2d,
        nn.BatchNorm2d,
        nn.InstanceNorm2d,
        nn.ReflectionPad2d,
        nn.ReplicationPad2d,
        "bilinear",
    ),
    3: Layers(
        nn.Conv3d,
        nn.ConvTranspose3d,
        nn.MaxPool3d,
        nn.BatchNorm3d,
        nn.InstanceNorm3d,
        nn.ReflectionPad3d,
        nn.ReplicationPad3d,
        "trilinear",
    ),
}
# Activation names a model may take; none has parameters, so the choice never changes the keys.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
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
    """A normalization layer over ``num_channels`` channels; ``None`` gives identity.

    "instance" has torch's defaults, as the toolkit's: no learned scale, no running stats,
    so no state_dict entries."""
    check_choice("norm", norm, NORMS)
    layers = layers_for(ndim)
    if norm == "batch":
        return layers.batch_norm(num_channels)
    if norm == "instance":
        return layers.instance_norm(num_channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, num_channels), num_channels)
    return nn.Identity()


def conv_bias(norm: str | None) -> bool:
    """Whether a conv before `norm` has a bias: not when the norm learns a shift of its own."""
    return norm not in ("batch", "group")


def make_activation(activation: str, *, inplace: bool = False) -> nn.Module:
    """The activation layer named `activation` (a key of `ACTIVATIONS`)."""
    check_choice("activation", activation, list(ACTIVATIONS))
    kind = ACTIVATIONS[activation]
    return kind() if kind is nn.GELU else kind(inplace=inplace)  # GELU has no in-place form


def conv_norm_act_layers(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    norm: str | None,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    activation: str = "relu",
    inplace: bool = True,
) -> list[nn.Module]:
    """Conv (same padding by default), norm (left out for ``None``), activation.

    The conv has a bias unless the norm learns a shift (`conv_bias`)."""
    conv = layers_for(ndim).conv(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2 if padding is None else padding,
        bias=conv_bias(norm),
    )
    norm_layer = [] if norm is None else [make_norm(norm, ndim, out_channels)]
    return [conv, *norm_layer, make_activation(activation, inplace=inplace)]


def conv_norm_act(
    ndim: int, in_channels: int, out_channels: int, *, norm: str | None
) -> nn.Sequential:
    """`conv_norm_act_layers` of a 3-wide conv as one block (keys ``0`` conv, ``1`` norm)."""
    return nn.Sequential(*conv_norm_act_layers(ndim, in_channels, out_channels, norm=norm))


class DoubleConv(nn.Module):
    """Two 3-wide conv-norm-ReLU layers in one Sequential, ``double_conv``; the spatial shape
    is kept. Keys ``double_conv.0`` and ``.3`` are the convs, ``.1`` and ``.4`` the norms
    (without norm: convs ``.0`` and ``.2``)."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        *,
        norm: str | None,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        self.double_conv = nn.Sequential(
            *conv_norm_act_layers(ndim, in_channels, mid, norm=norm),
            *conv_norm_act_layers(ndim, mid, out_channels, norm=norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x max-pooling, then a `DoubleConv`: one Sequential, ``maxpool_conv``."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, *, norm: str | None) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            layers_for(ndim).max_pool(2), DoubleConv(ndim, in_channels, out_channels, norm=norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)  # (B, out, *spatial // 2)


def pad_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of `x` (B, C, *spatial) to `shape`, the smaller half first."""
    pads: list[int] = []
    for size, target in zip(reversed(x.shape[2:]), reversed(shape), strict=True):
        missing = int(target) - int(size)  # F.pad takes the last axis first
        pads += [missing // 2, missing - missing // 2]
    return functional.pad(x, pads) if any(pads) else x


class Up(nn.Module):
    """Upsample by 2 (``up``), zero-pad to the skip's shape, concatenate [skip, x] on channels,
    then a `DoubleConv` (``conv``).

    "transposed": a learned 2x transposed conv to ``skip_channels``. "linear": bi/trilinear
    interpolation (align_corners), channels kept; the double conv's first conv goes to
    ``mid_channels``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        norm: str | None,
        upsample: str,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        layers = layers_for(ndim)
        self.up: nn.Module
        if upsample == "transposed":
            self.up = layers.conv_transpose(in_channels, skip_channels, kernel_size=2, stride=2)
            in_channels = skip_channels
        else:
            self.up = nn.Upsample(scale_factor=2, mode=layers.interpolation, align_corners=True)
        self.conv = DoubleConv(
            ndim, skip_channels + in_channels, out_channels, norm=norm, mid_channels=mid_channels
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = pad_to(self.up(x), skip.shape[2:])  # (B, C, *skip spatial): odd sizes are padded
        return self.conv(torch.cat([skip, x], dim=1))  # (B, out, *skip spatial)


class OutputConv(nn.Module):
    """A 1-wide conv with bias (``conv``) to the output channels: raw logits."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = layers_for(ndim).conv(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class Checkpointable(nn.Module):
    """A module whose forward runs its blocks through `run_block`: with
    ``activation_checkpointing`` set, in training mode with gradients on, each block keeps
    only its inputs and recomputes its inner activations in the backward pass (less memory,
    about one more forward of compute). Outputs, gradients and BatchNorm statistics are those
    of a plain forward (`enable_activation_checkpointing`)."""

    activation_checkpointing: bool = False

    def run_block(self, block: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """``block(*inputs)``, checkpointed when on; ``block`` is a module (or a Sequential
        of some of this module's layers)."""
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return block(*inputs)
        output: torch.Tensor = checkpoint(
            block,
            *inputs,
            use_reentrant=False,  # the recommended kind: works with DDP, compile and kwargs
            context_fn=lambda: (contextlib.nullcontext(), buffers_kept(block)),
        )
        return output


@contextlib.contextmanager
def buffers_kept(block: object) -> Iterator[None]:
    """The block's buffers as they were before the body: the backward pass's recomputation
    would otherwise update BatchNorm's running statistics a second time."""
    buffers = list(block.buffers()) if isinstance(block, nn.Module) else []
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in every csc block of `model` (csc's UNet,
    ResidualNet and ViTNet, their toolkit names, or a model holding one); a ValueError for a
    model without any, which would otherwise train with no memory saved."""
    parts = [module for module in model.modules() if isinstance(module, Checkpointable)]
    if not parts:
        raise ValueError(
            f"activation_checkpointing = True works with csc's models (UNet, ResidualNet, "
            f"ViTNet and the toolkit's UNet_2D, UNet_3D, ResNet, ViTVNet), but the model is a "
            f"{type(model).__name__}: set activation_checkpointing = False, or checkpoint its "
            "blocks in its own forward with torch.utils.checkpoint.checkpoint(block, x, "
            "use_reentrant=False)"
        )
    for part in parts:
        part.activation_checkpointing = True
