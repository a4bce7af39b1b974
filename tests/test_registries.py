"""csc.registries: every entry resolves to what its builder needs, and the config validates
names against exactly these dicts."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from csc import registries
from csc.config import DEFAULT_SPATIAL_TRANSFORMS, build_config
from csc.data.transforms import SPATIAL_TRANSFORMS
from csc.losses import LOSSES, SegmentationLoss
from csc.models import MODELS
from csc.optim import OPTIMIZERS, SCHEDULERS


def entries(registry: Mapping[str, Any]) -> list[Any]:
    return [pytest.param(name, value, id=name) for name, value in registry.items()]


@pytest.mark.parametrize(("name", "entry"), entries(registries.MODELS))
def test_model_entry_is_a_module_taking_its_fixed_arguments(
    name: str, entry: registries.ModelEntry
) -> None:
    model = registries.resolve(entry.reference)
    assert isinstance(model, type) and issubclass(model, nn.Module), name
    parameters = inspect.signature(model).parameters
    assert {*entry.fixed, "out_channels"} <= set(parameters), name
    assert MODELS[name].model is model and MODELS[name].fixed == entry.fixed


@pytest.mark.parametrize(("name", "reference"), entries(registries.OPTIMIZERS))
def test_optimizer_entry_is_an_optimizer(name: str, reference: str) -> None:
    optimizer = registries.resolve(reference)
    assert isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer), name


@pytest.mark.parametrize(("name", "reference"), entries(registries.SCHEDULERS))
def test_scheduler_entry_takes_an_optimizer(name: str, reference: str) -> None:
    scheduler = registries.resolve(reference)
    assert isinstance(scheduler, type), name
    assert next(iter(inspect.signature(scheduler).parameters)) == "optimizer", name


@pytest.mark.parametrize(("name", "reference"), entries(registries.LOSSES))
def test_loss_entry_is_a_csc_loss(name: str, reference: str) -> None:
    loss = registries.resolve(reference)
    assert isinstance(loss, type) and issubclass(loss, SegmentationLoss), name
    assert LOSSES[name] is loss


@pytest.mark.parametrize(("name", "reference"), entries(registries.SPATIAL_TRANSFORMS))
def test_spatial_transform_entry_is_a_step(name: str, reference: str) -> None:
    step = registries.resolve(reference)
    assert SPATIAL_TRANSFORMS[name] is step
    assert list(inspect.signature(step).parameters) == ["rows", "axes", "rng"]
    assert name in DEFAULT_SPATIAL_TRANSFORMS  # its example in the config's error messages


def test_builders_hold_exactly_the_registry_names() -> None:
    assert list(MODELS) == list(registries.MODELS)
    assert list(LOSSES) == list(registries.LOSSES)
    assert list(SPATIAL_TRANSFORMS) == list(registries.SPATIAL_TRANSFORMS)
    assert list(OPTIMIZERS) == list(registries.OPTIMIZERS)
    assert list(SCHEDULERS) == list(registries.SCHEDULERS)


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("model_name", registries.MODELS),
        ("optimizer", registries.OPTIMIZERS),
        ("scheduler", registries.SCHEDULERS),
        ("criterion", registries.LOSSES),
    ],
)
def test_config_lists_the_registry_names(key: str, registry: Mapping[str, Any]) -> None:
    available = ", ".join(repr(name) for name in sorted(registry))
    with pytest.raises(ValueError, match=f"unknown {key} 'nope'; available: {available}"):
        build_config({key: "nope"})
    for name in registry:
        build_config({key: name})


def test_config_lists_the_spatial_transforms() -> None:
    available = ", ".join(repr(name) for name in registries.SPATIAL_TRANSFORMS)
    with pytest.raises(ValueError, match=f"key 'flip'; available: {available}$"):
        build_config({"spatial_transforms": {"flip": {"axes": {"x": 0.5}}}})
    build_config({"spatial_transforms": DEFAULT_SPATIAL_TRANSFORMS})


@pytest.mark.parametrize(("name", "reference"), entries(registries.PROCESS_FUNCS))
def test_process_func_entry_labels_a_class(name: str, reference: str) -> None:
    """Each named method turns one instance class's probabilities into labels: 0 where p is
    low, nonzero where it is high."""
    from csc.labelling import ClassJob

    method = registries.resolve(reference)
    probabilities = np.zeros((4, 6, 6), dtype=np.float32)
    probabilities[1:3, 1:4, 1:4] = 0.9
    made: list[np.ndarray] = []
    job = ClassJob(
        read=lambda box: probabilities[box],
        shape=probabilities.shape,
        block_shape=(2, 3, 3),
        create=lambda dtype: made.append(np.zeros(probabilities.shape, dtype)) or made[0],
        instance=True,
    )
    assert method(job)["method"] == name
    np.testing.assert_array_equal(made[0] > 0, probabilities > 0.5)
