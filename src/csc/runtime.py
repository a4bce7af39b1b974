"""What training and prediction share: the device, precision (autocast), memory format, the
model a config builds, and wrapping it (torch.compile, DDP) and unwrapping it again.

`csc.training` and `csc.prediction` both import this module; neither imports the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from csc.config import TrainConfig
from csc.distributed import Dist
from csc.models import build_model, check_input_shape

if TYPE_CHECKING:  # only its type: csc.checkpoints, which imports this, never reads data
    from csc.data.datasets import PatchSpec

AUTOCAST_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP/DataParallel and torch.compile


def choose_device(name: str | None) -> torch.device:
    """The config's device, else cuda, then mps, then cpu. A `device` this machine lacks is a
    `ValueError` naming the key."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = f"torch {torch.__version__} sees no CUDA GPU here"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        missing = f"this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 on"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        missing = "MPS (Apple GPU) is not available here"
    else:
        return device
    raise ValueError(
        f"device {name!r}: {missing}; set device = None to use what there is, or 'cpu'"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to the `precision`'s dtype on `device`; nothing for ``"32"``."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def channels_last_format(
    config: TrainConfig, device: torch.device, spec: PatchSpec
) -> torch.memory_format | None:
    """channels_last (2D) or channels_last_3d when `channels_last` says so; by default on
    CUDA with bf16/fp16 autocast, where tensor-core convolutions want channels innermost."""
    use = config.channels_last
    if use is None:
        use = device.type == "cuda" and config.precision != "32"
    if not use:
        return None
    return torch.channels_last if spec.plane_axis is not None else torch.channels_last_3d


def in_memory_format(model: nn.Module, memory_format: torch.memory_format | None) -> nn.Module:
    """The model with its parameters in `memory_format` (unchanged for None)."""
    if memory_format is None:
        return model
    # Module.to takes memory_format (torch's documented signature); its stub's overloads omit it.
    return model.to(memory_format=memory_format)  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True)
class ModelArguments:
    """What `build_model` is given for a registry model: enough to build it again from a
    checkpoint (`csc.checkpoints.load_model`)."""

    model_name: str
    num_classes: int
    model_kwargs: dict[str, Any]

    def build(self) -> nn.Module:
        return build_model(self.model_name, num_classes=self.num_classes, **self.model_kwargs)


def model_arguments(config: TrainConfig, spec: PatchSpec) -> ModelArguments | None:
    """The registry model a config asks for (vitnet's ``img_size`` defaults to the patch's
    (z, y, x) or (H, W) shape); None when the config gives its own `model`."""
    if config.model is not None:
        return None
    kwargs = dict(config.model_kwargs)
    if config.model_name == "vitnet":
        kwargs.setdefault("img_size", spec.in_plane(spec.input.shape))
    return ModelArguments(config.model_name, len(config.classes), kwargs)


def make_model(config: TrainConfig, spec: PatchSpec) -> nn.Module:
    """The config's `model`, or `model_name` from the registry with `model_kwargs`; checked
    against the patch shape before any data is read."""
    arguments = model_arguments(config, spec)
    model = config.model if arguments is None else arguments.build()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        check_input_shape(unwrap(model), spec.in_plane(spec.input.shape))
    except ValueError as error:  # name the config key the shape came from
        raise ValueError(f"input_array_info: {error}") from None
    return model


def wrap_model(
    model: nn.Module, config: TrainConfig, place: Dist, device: torch.device
) -> nn.Module:
    """torch.compile (when `compile`), then DDP under torchrun (gradients averaged over
    ranks at every backward; rank 0's initial weights are broadcast to the others)."""
    if config.compile:
        options = config.compile if isinstance(config.compile, dict) else {}
        # torch.compile of a module returns an OptimizedModule (a Module); its stub says Callable.
        model = torch.compile(model, **options)  # type: ignore[assignment]
    if place.enabled:
        device_ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model: nn.Module, *, keep_compiled: bool = False) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``).

    With `keep_compiled`, only DDP/DataParallel come off: validation runs the compiled module
    without DDP's per-forward collectives (ranks validate different numbers of batches).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif not keep_compiled and isinstance(
            inner := getattr(model, "_orig_mod", None), nn.Module
        ):
            model = inner
        else:
            return model


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without ``module.``/``_orig_mod.`` prefixes that every key shares."""
    stripped = state
    while stripped:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in stripped)), "")
        if not prefix:
            break
        stripped = {key[len(prefix) :]: value for key, value in stripped.items()}
    # An unchanged state dict keeps its `_metadata` (module versions that load_state_dict uses).
    return stripped if isinstance(stripped, dict) else dict(stripped)
