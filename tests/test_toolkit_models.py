"""The challenge toolkit's model classes in csc: the same state_dict keys, shapes, dtypes and
layers as the toolkit's, and a checkpoint round trip: a toolkit checkpoint loads into csc's
class with every tensor matched, trains on, and csc's saved weights carry every toolkit key
again. The toolkit's facts are tests/data/toolkit_models.json (measured with its own classes:
shared/challenge/models.json, trimmed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from csc.checkpoints import load_weights, save_checkpoint
from csc.config import build_config
from csc.models import ResNet, UNet, UNet_2D, UNet_3D, ViTVNet, check_input_shape
from csc.synth import write_synthetic
from csc.training import train
from tests.test_train import SPEC, settings

TOOLKIT = json.loads((Path(__file__).parent / "data" / "toolkit_models.json").read_text())
# models.json's entries by the call that built them, and csc's equivalent call.
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "UNet_2D(1, 3)": lambda: UNet_2D(1, 3),
    "UNet_3D(1, 3)": lambda: UNet_3D(1, 3),
    "ResNet(ndims=2, output_nc=3)": lambda: ResNet(ndims=2, output_nc=3),
    "ResNet(ndims=3, output_nc=3)": lambda: ResNet(ndims=3, output_nc=3),
    "ViTVNet(3, img_size=(64, 64, 64))": lambda: ViTVNet(3, img_size=(64, 64, 64)),
}
HEAVY = {"UNet_3D(1, 3)", "ViTVNet(3, img_size=(64, 64, 64))"}  # 90 M parameters; 64^3 input
QUICK_TRAINING = {"ResNet(ndims=2, output_nc=3)"}  # the others' full-size training step is slow


def cases(quick: set[str] | None = None) -> list[Any]:
    """One case per toolkit class; slow unless in `quick` (default: all but the heavy ones)."""
    quick = set(BUILDERS) - HEAVY if quick is None else quick
    marks = {name: [] if name in quick else [pytest.mark.slow] for name in BUILDERS}
    ids = {name: name.split("(")[0] + ("-3d" if "ndims=3" in name else "") for name in BUILDERS}
    return [pytest.param(name, marks=marks[name], id=ids[name]) for name in BUILDERS]


def layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], str]]:
    """Each entry's key, shape and dtype, in order."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def expected_layout(entry: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(key, tuple(shape), dtype) for key, shape, dtype in entry["state_dict"]]


def toolkit_state(entry: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A state_dict with exactly the toolkit's keys, shapes and dtypes, seeded random values
    that a network runs stably on (positive BatchNorm variances, small weights)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in expected_layout(entry):
        if dtype == "int64":  # BatchNorm's num_batches_tracked
            state[key] = torch.randint(0, 1000, shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            state[key] = 0.02 * torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("name", cases())
def test_same_state_dict_and_layers_as_the_toolkit(name: str) -> None:
    entry = TOOLKIT["models"][name]
    model = BUILDERS[name]()
    assert layout(model.state_dict()) == expected_layout(entry)
    assert sum(p.numel() for p in model.parameters()) == entry["n_parameters"]
    buffers = sum(b.numel() for b in model.buffers())
    assert buffers == entry["n_buffer_elements"]
    # The forward facts: in-place ReLU, no bias before BatchNorm, InstanceNorm without state...
    leaves = {n: repr(m) for n, m in model.named_modules() if not list(m.children())}
    for leaf, description in entry["leaf_modules"]:
        assert leaves.get(leaf) == description, leaf


@pytest.mark.parametrize("name", cases(QUICK_TRAINING))
def test_a_toolkit_checkpoint_loads_trains_and_saves_back(name: str, tmp_path: Path) -> None:
    entry = TOOLKIT["models"][name]
    toolkit_file = tmp_path / "toolkit" / "model_5.pth"
    toolkit_file.parent.mkdir()
    torch.save(toolkit_state(entry, seed=0), toolkit_file)  # as the toolkit saves its weights
    saved = torch.load(toolkit_file, weights_only=True)

    model = BUILDERS[name]()
    load_weights(model, saved, source=str(toolkit_file))  # strict: every key, every shape
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

    model.train()  # one training step at the toolkit's example shape, batch 2 (BatchNorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    spatial = entry["example_input_shape"][2:]
    inputs = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(1))
    output = model(inputs)
    assert tuple(output.shape) == (2, *entry["example_output_shape"][1:])
    loss = nn.functional.binary_cross_entropy_with_logits(output, torch.rand_like(output))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)

    template = str(tmp_path / "csc" / "{model_name}_{epoch}.pth")
    path = save_checkpoint(model.state_dict(), None, template=template, model_name="m", epoch=6)
    written = torch.load(path, weights_only=True)
    assert layout(written) == expected_layout(entry)  # every toolkit key, shape and dtype
    trained = next(k for k in written if k.endswith("weight"))
    assert not torch.equal(written[trained], saved[trained])  # trained on
    counters = [k for k in written if k.endswith("num_batches_tracked")]
    assert all(written[k] == saved[k] + 1 for k in counters)  # one BatchNorm step
    again = BUILDERS[name]()
    again.load_state_dict(written)  # strict, as the toolkit's class loads it


def test_toolkit_unets_pad_odd_sizes() -> None:
    """The upsampled map is zero-padded to its skip's size (floor/ceil split): any size >= 16
    goes through and comes back at its own size."""
    model = UNet_2D(1, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 33, 50)).shape == (1, 2, 33, 50)
    check_input_shape(model, (33, 50))
    with pytest.raises(ValueError, match=r"\(8, 50\) is smaller than 16 for UNet_2D"):
        check_input_shape(model, (8, 50))
    small = UNet(3, 1, 2, base_channels=2, num_levels=3, upsample="linear").eval()
    with torch.no_grad():
        assert small(torch.randn(1, 1, 9, 17, 23)).shape == (1, 2, 9, 17, 23)


def test_trilinear_unet_widths() -> None:
    """trilinear=True: interpolation, down4 ends at 512, the ups at 256, 128, 64, 64, and
    each double conv's middle width is half its input."""
    model = UNet_3D(1, 3, trilinear=True)
    state = model.state_dict()
    assert state["down4.maxpool_conv.1.double_conv.3.weight"].shape[0] == 512
    outs = [state[f"up{i}.conv.double_conv.3.weight"].shape[0] for i in (1, 2, 3, 4)]
    assert outs == [256, 128, 64, 64]
    assert state["up1.conv.double_conv.0.weight"].shape[:2] == (512, 1024)
    assert not any(key.startswith("up1.up.") for key in state)
    assert (
        repr(model.get_submodule("up1.up")) == ("Upsample(scale_factor=2.0, mode='trilinear')")
        and model.get_submodule("up1.up").align_corners
    )


def test_resnet_takes_the_toolkits_arguments() -> None:
    default = ResNet(2)
    assert default.output_nc == 64  # output_nc=None: ngf, as the toolkit
    batch = ResNet(2, output_nc=2, ngf=4, n_blocks=1, norm_layer=nn.BatchNorm2d)
    keys = list(batch.state_dict())
    assert "model.1.bias" not in keys and "model.2.running_mean" in keys  # no bias before BN
    zeros = ResNet(3, output_nc=2, ngf=4, n_blocks=1, padding_type="zeros", use_dropout=True)
    keys = list(zeros.state_dict())
    assert keys[:2] == ["model.0.weight", "model.0.bias"]  # no pad layers: indices shift
    assert "model.9.conv_block.4.weight" in keys  # after the dropout
    leaky = ResNet(2, output_nc=1, ngf=4, n_blocks=0, activation=nn.LeakyReLU)
    assert isinstance(leaky.model[3], nn.LeakyReLU)
    same = ResNet(2, output_nc=1, ngf=4, n_blocks=0, padding_type="Same")
    assert isinstance(same.model[0], nn.ReflectionPad2d)
    with pytest.raises(ValueError, match="padding_type='valid'"):
        ResNet(2, padding_type="valid")
    with pytest.raises(ValueError, match=r"norm_layer .* is not one csc builds"):
        ResNet(2, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        ResNet(4)


def test_vitvnet_takes_positional_arguments_and_a_config() -> None:
    """``ViTVNet(out_channels, config, img_size, vis)``: the named config or a dict of its
    fields; position embeddings follow img_size (the only shape that does)."""
    config = TOOLKIT["vitvnet_config"]
    tiny = {"hidden_size": 24, "num_layers": 1, "num_heads": 2, "mlp_dim": 16}
    model = ViTVNet(2, "ViT-V-Net", (32, 32, 32), True, **tiny).eval()
    assert model.state_dict()["transformer.embeddings.position_embeddings"].shape == (1, 1, 24)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    assert [w.shape for w in model.attention_weights] == [(1, 2, 1, 1)]  # vis keeps them
    from_dict = ViTVNet(2, config, (32, 32, 32), **tiny)
    assert layout(from_dict.state_dict()) == layout(model.state_dict())
    with pytest.raises(ValueError, match="n_skip is 4, but csc builds 5"):
        ViTVNet(2, {**config, "n_skip": 4}, (32, 32, 32), **tiny)
    with pytest.raises(ValueError, match="unknown ViTVNet config 'R50'"):
        ViTVNet(2, "R50")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toolkit-data")
    write_synthetic(out, SPEC)
    return out


@pytest.mark.slow
def test_csc_training_fine_tunes_a_toolkit_checkpoint_and_saves_toolkit_keys(
    data: Path, tmp_path: Path
) -> None:
    """A config's own `UNet_2D` with ``model_to_load`` naming the toolkit's file: csc trains
    on from its weights and writes weights the toolkit's class loads strictly."""
    entry = TOOLKIT["models"]["UNet_2D(1, 3)"]
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save(toolkit_state(entry, seed=0), folder / "toolkit_unet_5.pth")
    overrides = {"model_name": "tuned", "model_to_load": "toolkit_unet", "epochs": 1}
    config = build_config(settings(data, tmp_path, model=UNet_2D(1, 3), **overrides))
    result = train(config)
    assert (result.first_epoch, result.last_epoch) == (1, 1)  # a fine-tune: epochs from 1
    written = torch.load(folder / "tuned_1.pth", weights_only=True)
    assert layout(written) == expected_layout(entry)
    UNet_2D(1, 3).load_state_dict(written)  # strict
    started = torch.load(folder / "toolkit_unet_5.pth", weights_only=True)
    assert not torch.equal(written["outc.conv.weight"], started["outc.conv.weight"])
