"""csc.models: every registry entry trains one step; compat names, errors and the shape check."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from csc.config import MODEL_NAMES
from csc.models import (
    MODELS,
    ResNet,
    UNet,
    UNet_2D,
    UNet_3D,
    ViTNet,
    ViTVNet,
    build_model,
    check_input_shape,
)

NUM_CLASSES = 3
TINY_TRANSFORMER = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
TINY_VIT = {**TINY_TRANSFORMER, "encoder_channels": (4, 8), "patch_size": 2}
# Registry name -> cases of (small model_kwargs, spatial shape). A name missing here is built
# with its defaults on a 64-wide patch, 2D or 3D as its name says.
SMALL: dict[str, list[tuple[dict[str, Any], tuple[int, ...]]]] = {
    "2d_unet": [({"base_channels": 4, "num_levels": 2}, (16, 16))],
    "3d_unet": [({"base_channels": 2, "num_levels": 2, "upsample": "linear"}, (8, 8, 8))],
    "2d_resnet": [({"ngf": 4, "n_blocks": 1}, (16, 16))],
    "3d_resnet": [({"ngf": 2, "n_blocks": 1, "norm": "group"}, (8, 8, 8))],
    "vitnet": [
        (TINY_VIT | {"img_size": (16, 16)}, (16, 16)),
        (TINY_VIT | {"img_size": (8, 8, 8)}, (8, 8, 8)),
    ],
}


def registry_cases() -> list[Any]:
    cases = []
    for name in sorted(MODELS):
        default = [({}, (64,) * (3 if name.startswith("3d") else 2))]
        for kwargs, shape in SMALL.get(name, default):
            cases.append(pytest.param(name, kwargs, shape, id=f"{name}-{len(shape)}d"))
    return cases


@pytest.mark.parametrize(("name", "kwargs", "shape"), registry_cases())
def test_registry_model_trains_one_step(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=NUM_CLASSES, **kwargs)
    check_input_shape(model, shape)
    output = model(torch.randn(2, 1, *shape))  # (B, C, *spatial)
    assert output.shape == (2, NUM_CLASSES, *shape)
    output.sum().backward()
    for parameter_name, parameter in model.named_parameters():
        grad = parameter.grad
        assert grad is not None and torch.isfinite(grad).all(), parameter_name
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *shape)).shape == (1, NUM_CLASSES, *shape)


def test_registry_matches_config_names() -> None:
    assert tuple(sorted(MODELS)) == MODEL_NAMES
    assert set(SMALL) <= set(MODELS)


@pytest.mark.parametrize(
    ("build", "shape", "out_channels"),
    [
        (lambda: UNet_2D(1, 3), (32, 32), 3),
        (lambda: UNet_3D(1, 2, trilinear=True), (16, 16, 16), 2),
        (lambda: ResNet(ndims=2, output_nc=2, ngf=8, n_blocks=1), (32, 32), 2),
        (lambda: ViTVNet(2, img_size=(32, 32, 32), **TINY_TRANSFORMER), (32, 32, 32), 2),
        (lambda: ViTVNet(2, img_size=(1, 32, 32), **TINY_TRANSFORMER), (32, 32), 2),
    ],
    ids=["UNet_2D", "UNet_3D", "ResNet", "ViTVNet-3d", "ViTVNet-singleton-z"],
)
def test_compat_constructors(
    build: Callable[[], nn.Module], shape: tuple[int, ...], out_channels: int
) -> None:
    model = build().eval()
    with torch.no_grad():
        output = model(torch.randn(1, 1, *shape))  # batch of 1 in eval mode
    assert output.shape == (1, out_channels, *shape)


def test_compat_attributes() -> None:
    unet = UNet_2D(1, 2, trilinear=True)
    assert (unet.n_channels, unet.n_classes, unet.trilinear, unet.ndim) == (1, 2, True, 2)
    resnet = ResNet(ndims=3, input_nc=2, output_nc=4, ngf=4, n_blocks=0)
    assert (resnet.ndims, resnet.input_nc, resnet.output_nc, resnet.ngf) == (3, 2, 4, 4)


def test_unknown_model_lists_names() -> None:
    expected = "unknown model 'unet3d'; available: 2d_resnet, 2d_unet, 3d_resnet, 3d_unet, vitnet"
    with pytest.raises(ValueError, match=expected):
        build_model("unet3d", num_classes=2)


def test_bad_model_kwargs_name_model_and_key() -> None:
    with pytest.raises(ValueError, match=r"'trilinear' for 2d_unet; valid: base_channels, "):
        build_model("2d_unet", num_classes=2, trilinear=True)
    with pytest.raises(ValueError, match=r"'in_channels' for 3d_resnet"):
        build_model("3d_resnet", num_classes=2, in_channels=2)
    with pytest.raises(ValueError, match=r"^2d_unet: norm must be one of batch, instance"):
        build_model("2d_unet", num_classes=2, norm="layer")


def test_check_input_shape_suggests_nearest_shapes() -> None:
    model = UNet(3, 1, 1, base_channels=2, num_levels=4)
    expected = (
        "input shape (100, 100, 100) is not divisible by 16 for UNet (4 poolings); "
        "try (96, 96, 96) or (112, 112, 112)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_input_shape(model, (100, 100, 100))
    resnet = ResNet(2, ngf=2, n_blocks=0)
    with pytest.raises(
        ValueError, match=r"by 4 for ResNet \(2 downsamplings\); try \(8, 8\) or \(8, 12\)$"
    ):
        check_input_shape(resnet, (8, 10))
    with pytest.raises(ValueError, match=r"; try \(4, 8\)$"):  # no shape of size 0
        check_input_shape(resnet, (2, 8))
    with pytest.raises(ValueError, match=r"UNet is 3D but input shape \(64, 64\) has 2 axes"):
        check_input_shape(model, (64, 64))


def test_check_input_shape_passes_good_shapes() -> None:
    check_input_shape(UNet(3, 1, 1, base_channels=2), (16, 32, 160))
    check_input_shape(UNet(2, 1, 1, base_channels=2), (1, 64, 48))  # 2D patch with its z axis
    check_input_shape(nn.Conv2d(1, 1, 3), (7, 5))  # no divisor: nothing to check


def test_check_input_shape_vitnet_needs_img_size() -> None:
    model = ViTNet(2, img_size=(32, 32, 32), **TINY_TRANSFORMER)
    check_input_shape(model, (32, 32, 32))
    with pytest.raises(
        ValueError, match=r"built for img_size \(32, 32, 32\), got .* \(16, 16, 16\)"
    ):
        model(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(
        ValueError, match=r"does not match .* build it with img_size=\(64, 64, 64\)"
    ):
        check_input_shape(model, (64, 64, 64))
    with pytest.raises(ValueError, match=r"try \(32, 32, 32\) or \(48, 48, 48\) \(and ViTNet"):
        check_input_shape(model, (40, 40, 40))
    with pytest.raises(ValueError, match=r"img_size \(40, 40\) is not divisible by 16"):
        ViTNet(2, img_size=(40, 40))
