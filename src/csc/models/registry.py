"""The models a config can name (`MODELS`), `build_model`, and the input shape check."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from csc import registries
from csc.models.layers import divisibility_error, spatial_shape


@dataclasses.dataclass(frozen=True)
class ModelFactory:
    """Builds ``model`` with ``fixed`` arguments (dimension, 1 input channel) and
    ``num_classes`` output channels (``out_channels``). Every other keyword argument of the
    constructor is an option a config may set in ``model_kwargs``."""

    model: type[nn.Module]
    fixed: Mapping[str, Any]

    def __call__(self, num_classes: int, **model_kwargs: Any) -> nn.Module:
        return self.model(**self.fixed, out_channels=num_classes, **model_kwargs)

    def options(self) -> dict[str, Any]:
        """The keyword arguments ``model_kwargs`` may hold, with their defaults."""
        taken = {*self.fixed, "out_channels"}
        parameters = inspect.signature(self.model).parameters.values()
        return {p.name: p.default for p in parameters if p.name not in taken}


# The registry's names (csc.registries.MODELS), each with its class imported.
MODELS: dict[str, ModelFactory] = {
    name: ModelFactory(registries.resolve(entry.reference), entry.fixed)
    for name, entry in registries.MODELS.items()
}


def build_model(name: str, *, num_classes: int, **model_kwargs: Any) -> nn.Module:
    """The registry model ``name`` with 1 input channel and ``num_classes`` outputs (logits)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    options = factory.options()
    for key in model_kwargs:
        if key not in options:
            raise ValueError(
                f"unknown model_kwargs key {key!r} for {name}; valid: {', '.join(sorted(options))}"
            )
    try:
        return factory(num_classes, **model_kwargs)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def check_input_shape(model: nn.Module, shape: Sequence[int]) -> None:
    """Raise ValueError if ``model`` cannot take inputs of spatial ``shape``.

    ``shape`` may carry singleton axes beyond the model's dimension: a (1, 128, 128) patch is
    checked as (128, 128) for a 2D model. Models without a known ``divisor`` always pass; those
    that pad odd sizes (``pads_odd_sizes``: the toolkit's UNets) need each size >= it.
    ``model`` is the architecture itself: `csc.runtime.unwrap` takes DDP and compile off.
    """
    divisor, ndim = getattr(model, "divisor", None), getattr(model, "ndim", None)
    if not isinstance(divisor, int) or not isinstance(ndim, int):
        return
    label = type(model).__name__
    spatial = spatial_shape(shape, ndim)
    if len(spatial) != ndim:
        raise ValueError(f"{label} is {ndim}D but input shape {tuple(shape)} has {len(shape)} axes")
    reason = getattr(model, "divisor_reason", "")
    described = f"{label} ({reason})" if reason else label
    if getattr(model, "pads_odd_sizes", False):  # the toolkit's UNets: any size, padded
        if min(spatial) < divisor:
            raise ValueError(f"input shape {spatial} is smaller than {divisor} for {described}")
        return
    error = divisibility_error(spatial, divisor, described)
    img_size = getattr(model, "img_size", None)
    if error and img_size is not None:
        error += f" (and {label} takes only its img_size, {img_size})"
    elif img_size is not None and tuple(img_size) != spatial:
        error = (
            f"input shape {spatial} does not match {label}'s img_size {tuple(img_size)}; "
            f"build it with img_size={spatial}"
        )
    if error:
        raise ValueError(error)
