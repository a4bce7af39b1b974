"""Predicting the challenge's test crops from a test crop manifest the tests write: the region
from the manifest (no labels), the raw read only around each crop and at the model's scale,
off-grid translations and crops finer than the model, the classes per crop, the errors (a
dataset with no raw, a crop outside its raw), the manifest from the option and from
$CSC_TEST_CROP_MANIFEST_URL, and `csc process --crops test`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.config import TrainConfig, build_config
from csc.data.datasets import PatchSpec
from csc.datasplit import ensure_datasplit
from csc.prediction import OutputGrid, Region, predict
from csc.runtime import make_model
from csc.storage import create_array, multiscales_attrs

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
HEADER = "crop_name,dataset,class_label,voxel_size,translation,shape\n"
RAMP = "jrc_ramp"
# The ramp's raw: 8 nm at s0 (voxel 0 centred at 0), 16 nm at s1 (centred at 4 nm, as a 2x mean
# puts it); its value at world (z, y, x) nm is (2z + y + x) / 8 on both levels (a linear ramp
# survives the mean), so linear interpolation anywhere inside gives exactly that.
RAMP_S0 = (48, 256, 256)
RAMP_CHUNKS = (8, 32, 32)  # s1 chunks: 128 x 512 x 512 nm


class Echo(torch.nn.Module):
    """Logits whose sigmoid is the input, for every class: a prediction equals the raw."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x.clamp(1e-6, 1 - 1e-6)).repeat_interleave(self.num_classes, dim=1)


def ramp(points: np.ndarray) -> np.ndarray:
    """The ramp's value at world points (..., 3) in nm."""
    return (2 * points[..., 0] + points[..., 1] + points[..., 2]) / 8


def write_ramp(root: Path) -> Path:
    """The ramp's raw group (uint16, two levels) under the CellMap layout at `root`."""
    path = root / RAMP / f"{RAMP}.zarr/recon-1/em/fibsem-uint8"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    levels = [((8.0,) * 3, (0.0,) * 3), ((16.0,) * 3, (4.0,) * 3)]
    group.attrs.update(multiscales_attrs("fibsem-uint8", levels))
    for n, (scale, translation) in enumerate(levels):
        shape = tuple(s // 2**n for s in RAMP_S0)
        centres = np.stack(
            np.meshgrid(
                *[t + s * np.arange(k) for t, s, k in zip(translation, scale, shape, strict=True)],
                indexing="ij",
            ),
            axis=-1,
        )
        values = np.rint(ramp(centres)).astype(np.uint16)
        array = create_array(
            group, f"s{n}", shape=shape, chunks=RAMP_CHUNKS, dtype="uint16", compressor="zstd"
        )
        array[...] = values
    return path


def corrupt_chunks(
    level: Path, keep: list[tuple[np.ndarray, np.ndarray]], scale: float, origin: float
) -> int:
    """Overwrite every chunk file of `level` whose box (nm) meets none of the `keep` boxes
    with bytes no decoder reads, so that reading it fails; returns how many."""
    done = 0
    for path in level.rglob("*"):
        parts = path.relative_to(level).parts
        if not path.is_file() or len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        index = np.array([int(p) for p in parts])
        low = origin - scale / 2 + index * np.array(RAMP_CHUNKS) * scale
        high = low + np.array(RAMP_CHUNKS) * scale
        if not any(np.all(low < b) and np.all(high > a) for a, b in keep):
            path.write_bytes(b"not a chunk")
            done += 1
    return done


def write_manifest(path: Path, rows: list[tuple[int, str, str, tuple, tuple, tuple]]) -> Path:
    def vector(values: tuple) -> str:
        return "[" + ";".join(str(v) for v in values) + "]"

    lines = [
        f"{crop},{dataset},{label},{vector(size)},{vector(translation)},{vector(shape)}\n"
        for crop, dataset, label, size, translation, shape in rows
    ]
    path.write_text(HEADER + "".join(lines))
    return path


# Crop 9101: 16 nm voxels, translation 6 nm past the 16 nm lattice (like crop 982), 2 nm off
# the raw's s1 voxel centres. Crop 9102: 4 nm voxels, finer than the model's 16 nm.
OFF_GRID = (9101, RAMP, (16.0,) * 3, (198.0, 614.0, 566.0), (4, 8, 8))
FINE = (9102, RAMP, (4.0,) * 3, (202.0, 498.0, 642.0), (16, 40, 24))


def ramp_rows(*extra: tuple[int, str, str, tuple, tuple, tuple]) -> list[Any]:
    crop, dataset, size, translation, shape = OFF_GRID
    fine, _, fine_size, fine_translation, fine_shape = FINE
    return [
        (crop, dataset, "nuc", size, translation, shape),
        (crop, dataset, "mito", size, translation, shape),
        (fine, dataset, "mito", fine_size, fine_translation, fine_shape),
        (fine, dataset, "er", fine_size, fine_translation, fine_shape),  # not the model's
        (9103, "jrc_nowhere", "cyto", (8.0,) * 3, (0.0,) * 3, (8, 8, 8)),  # nothing to save
        *extra,
    ]


@pytest.fixture(scope="module")
def ramp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ramp")
    write_ramp(root)
    return root


def ramp_config(root: Path, run: Path, **overrides: Any) -> TrainConfig:
    info = {"shape": (4, 8, 8), "scale": (16, 16, 16)}
    settings = {
        "search_path": f"{root}/{SEARCH}",
        "datasplit_path": f"{run}/datasplit.csv",  # none: the raw is found at search_path
        "classes": ("nuc", "mito"),
        "input_array_info": info,
        "target_array_info": info,
        "model": Echo(2),
        "model_name": "echo",
        "device": "cpu",
        "batch_size": 4,
        "prediction_encoding": "float16",
        "prediction_block_shape": (4, 8, 8),
        "predictions_path": f"{run}/predictions",
        **overrides,
    }
    return build_config(settings)


def test_test_crops_read_only_the_raw_around_them_and_land_where_the_manifest_says(
    ramp_data: Path, tmp_path: Path
) -> None:
    """Every raw chunk away from the crops, and all of s0 (finer than the model's 16 nm), is
    unreadable: prediction still succeeds, so it read only around the crops at the model's
    scale. An echo of the linear ramp shows each output voxel's world position exactly."""
    root = tmp_path / "data"
    write_ramp(root)  # a copy of its own: its chunks get broken
    manifest = write_manifest(tmp_path / "manifest.csv", ramp_rows())
    level = root / RAMP / f"{RAMP}.zarr/recon-1/em/fibsem-uint8"
    reach = np.array([64.0, 128.0, 128.0]) + 32  # half a window and a voxel or two, nm
    keep = []
    for _, _, size, translation, shape in (OFF_GRID, FINE):
        low = np.asarray(translation) - np.asarray(size) / 2
        keep.append((low - reach, low + np.asarray(size) * shape + reach))
    assert corrupt_chunks(level / "s0", [], 8.0, 0.0) == 6 * 8 * 8
    assert corrupt_chunks(level / "s1", keep, 16.0, 4.0) >= 8  # of 3 x 4 x 4
    with pytest.raises(Exception, match=r"."):  # whatever the decoder raises: unreadable
        np.asarray(zarr.open_group(str(level), mode="r")["s1"][...])
    config = ramp_config(root, tmp_path)
    torch.save({}, tmp_path / "echo.pth")
    with pytest.warns(UserWarning, match=r"crop9103 of .*manifest.csv score none of the model"):
        written = predict(
            config,
            test_crops=True,
            manifest=manifest,
            checkpoint=str(tmp_path / "echo.pth"),
            progress=False,
        )
    assert [(w.region.name, w.region.classes) for w in written] == [
        ("crop9101", ("nuc", "mito")),
        ("crop9102", ("mito",)),
    ]
    for item, (_, _, size, translation, shape) in zip(written, (OFF_GRID, FINE), strict=True):
        check_written(item.path, size, translation, shape, item.region.classes)
    assert sorted(p.name for p in (tmp_path / "predictions/jrc_ramp.zarr").glob("crop*")) == [
        "crop9101",
        "crop9102",
    ]


def check_written(path: Path, size: tuple, translation: tuple, shape: tuple, classes: Any) -> None:
    """The group at `path`: the classes asked for, OME-NGFF at 16 nm placed so that its box
    covers the crop's (voxel i's centre at translation + i * voxel size), values the ramp's
    at each voxel's centre."""
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == sorted(classes)
    crop_low = np.asarray(translation) - np.asarray(size) / 2
    crop_high = crop_low + np.asarray(size) * np.asarray(shape)
    for name in classes:
        group = zarr.open_group(str(path / name), mode="r")
        transforms = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        scale, origin = np.asarray(transforms[0]["scale"]), np.asarray(transforms[1]["translation"])
        values = np.asarray(group["s0"][...], dtype=np.float64)
        assert scale.tolist() == [16.0, 16.0, 16.0]
        low, high = origin - scale / 2, origin - scale / 2 + scale * np.asarray(values.shape)
        assert np.allclose(low, crop_low)  # the grid starts at the crop's edge
        assert np.all(high >= crop_high - 1e-9) and np.all(high - crop_high < scale)
        centres = np.stack(
            np.meshgrid(
                *[
                    o + s * np.arange(n)
                    for o, s, n in zip(origin, scale, values.shape, strict=True)
                ],
                indexing="ij",
            ),
            axis=-1,
        )
        np.testing.assert_allclose(values * 65535, ramp(centres), atol=0.3, err_msg=name)


def test_output_grid_starts_at_the_region_edge_wherever_it_lies() -> None:
    region = Region("d", "crop982", "raw", (-2.0, -2.0, -2.0), (2238.0, 6398.0, 6398.0))
    grid = OutputGrid.covering(region, (16.0, 16.0, 16.0))
    assert grid.translation == (6.0, 6.0, 6.0) and grid.shape == (140, 400, 400)
    fine = Region("d", "crop557", "raw", (23836.26, 7598.0, 35998.0), (24880.26, 8798.0, 37198.0))
    grid = OutputGrid.covering(fine, (8.0, 8.0, 8.0))
    assert grid.shape == (131, 150, 150)  # 1044 nm of z: 130.5 voxels, rounded up
    assert np.allclose(grid.translation, (23840.26, 7602.0, 36002.0))


def test_a_dataset_without_raw_and_a_crop_outside_its_raw_are_clear_errors(
    ramp_data: Path, tmp_path: Path
) -> None:
    config = ramp_config(ramp_data, tmp_path)
    absent = (9104, "jrc_absent", "nuc", (8.0,) * 3, (0.0,) * 3, (8, 8, 8))
    manifest = write_manifest(tmp_path / "absent.csv", ramp_rows(absent))
    with (
        pytest.warns(UserWarning, match="crop9103"),
        pytest.raises(
            FileNotFoundError,
            match=(
                r"dataset jrc_absent \(test crop crop9104\): no rows of it in .*datasplit.csv "
                r"and no raw at .*jrc_absent/jrc_absent.zarr/recon-1/em/fibsem-uint8; public copy: "
                r"s3://janelia-cosem-datasets/jrc_absent/jrc_absent.zarr/recon-1/em/fibsem-uint8"
                r"\n.*stream it from S3: set use_s3 = True"
            ),
        ),
    ):
        predict(config, test_crops=True, manifest=manifest, progress=False)
    outside = (9105, RAMP, "nuc", (16.0,) * 3, (198.0, 614.0, 1998.0), (4, 8, 8))
    manifest = write_manifest(tmp_path / "outside.csv", [outside])
    with pytest.raises(
        ValueError,
        match=r"test crop crop9105 of .*outside.csv \(z, y, x 190 to 254, 606 to 734, 1990 to "
        r"2118 nm\) reaches outside the raw of jrc_ramp .* x -4 to 2044 nm",
    ):
        predict(config, test_crops=True, manifest=manifest, progress=False)
    only = write_manifest(tmp_path / "only.csv", [ramp_rows()[-1]])
    with pytest.raises(ValueError, match=r"no test crop of .*only.csv scores any of the model's"):
        predict(config, test_crops=True, manifest=only, progress=False)


# --- Through the command line, with a briefly initialised model on tiny_synth ---------------

TINY_CLASSES = ("nuc", "mito", "er")


def tiny_settings(data: Path, run: Path) -> dict[str, Any]:
    info = {"shape": (1, 16, 16), "scale": (8, 8, 8)}
    return {
        "search_path": f"{data}/{SEARCH}",
        "datasplit_path": f"{run}/datasplit.csv",
        "classes": TINY_CLASSES,
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "2d_unet",
        "model_kwargs": {"num_levels": 2, "base_channels": 4},
        "batch_size": 4,
        "device": "cpu",
        "prediction_block_shape": (4, 16, 16),
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        "predictions_path": f"{run}/predictions",
        "processed_path": f"{run}/processed",
    }


def tiny_config_file(data: Path, run: Path) -> Path:
    """A config file for tiny_synth, its datasplit and a checkpoint (the model as built)."""
    settings = tiny_settings(data, run)
    config = build_config(settings)
    ensure_datasplit(config, echo=lambda _: None)
    spec = PatchSpec.from_arrays(config.input_array_info, config.target_array_info)
    weights = Path(config.model_save_path.format(model_name=config.model_name, epoch=1))
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_model(config, spec).state_dict(), weights)
    lines = [f"{key} = {value!r}" for key, value in settings.items()]
    lines.append("process_func = lambda p: (p > 0.5).astype('uint8')")
    path = run / "config.py"
    path.write_text("\n".join(lines) + "\n")
    return path


# Held out of the datasplit (ids no datasplit crop has), in tiny_synth's raw (8 nm, 128 x 256
# x 256 nm from -4 nm): one in each dataset, a third the model has no class of.
TINY_ROWS = [
    (9001, "jrc_synth1", "nuc", (4.0,) * 3, (34.0, 66.0, 98.0), (8, 16, 24)),
    (9001, "jrc_synth1", "mito", (4.0,) * 3, (34.0, 66.0, 98.0), (8, 16, 24)),
    (9002, "jrc_synth2", "er", (8.0,) * 3, (40.0, 8.0, 16.0), (4, 12, 8)),
]


def crop_groups(root: Path) -> list[str]:
    """dataset.zarr/crop of every crop group under an output folder."""
    return sorted(str(p.relative_to(root)) for p in root.glob("*.zarr/crop*"))


def test_csc_predict_and_process_crops_test(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config_file(tiny_synth, tmp_path)
    manifest = write_manifest(tmp_path / "manifest.csv", TINY_ROWS)
    runner = CliRunner()
    done = runner.invoke(
        cli, ["predict", str(config), "--crops", "test", "--test-crop-manifest", str(manifest)]
    )
    assert done.exit_code == 0, done.output
    assert "jrc_synth1.zarr/crop9001: 2 classes, (4, 8, 12) voxels of (8.0, 8.0, 8.0) nm" in (
        done.output
    )
    predictions = tmp_path / "predictions"
    expected = {"jrc_synth1.zarr/crop9001": ["mito", "nuc"], "jrc_synth2.zarr/crop9002": ["er"]}
    for crop, classes in expected.items():
        assert sorted(p.name for p in (predictions / crop).iterdir() if p.is_dir()) == classes
    attrs = dict(zarr.open_group(str(predictions / "jrc_synth2.zarr/crop9002/er"), mode="r").attrs)
    transforms = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms == [
        {"type": "scale", "scale": [8.0, 8.0, 8.0]},
        {"type": "translation", "translation": [40.0, 8.0, 16.0]},  # the crop's own grid
    ]
    assert attrs["csc_prediction"]["class"] == "er"
    # A datasplit crop too, and 9001 again from the manifest $CSC_TEST_CROP_MANIFEST_URL names.
    monkeypatch.setenv("CSC_TEST_CROP_MANIFEST_URL", f"file://{manifest}")
    done = runner.invoke(
        cli, ["predict", str(config), "--crops", "1,9001", "-o", str(tmp_path / "more")]
    )
    assert done.exit_code == 0, done.output
    assert crop_groups(tmp_path / "more") == [
        "jrc_synth1.zarr/crop1",
        "jrc_synth1.zarr/crop9001",
    ]
    # process --crops test: the manifest's predicted crops only (crop1 is not one).
    done = runner.invoke(
        cli, ["process", str(config), "--input", str(tmp_path / "more"), "--crops", "test"]
    )
    assert done.exit_code == 0, done.output
    assert crop_groups(tmp_path / "processed") == ["jrc_synth1.zarr/crop9001"]
    monkeypatch.delenv("CSC_TEST_CROP_MANIFEST_URL")
    done = runner.invoke(
        cli,
        ["process", str(config), "--crops", "test", "--test-crop-manifest", str(manifest), "-O"],
    )
    assert done.exit_code == 0, done.output
    processed = crop_groups(tmp_path / "processed")
    assert processed == ["jrc_synth1.zarr/crop9001", "jrc_synth2.zarr/crop9002"]
    done = runner.invoke(
        cli, ["predict", str(config), "--crops", "9003", "-o", str(tmp_path / "x")]
    )
    assert (
        done.exit_code == 1 and "--crops crop9003 matches no crop of the datasplit" in done.output
    )


def test_the_toolkit_adapter_predicts_and_processes_test_crops(
    tiny_synth: Path, tmp_path: Path
) -> None:
    import csc

    config = tiny_config_file(tiny_synth, tmp_path)
    manifest = write_manifest(tmp_path / "manifest.csv", TINY_ROWS)
    out = f"{tmp_path}/toolkit/{{dataset}}.zarr/{{crop}}"
    written = csc.predict(config, output_path=out, manifest=manifest, progress=False)
    assert [(w.path.parent.name, w.path.name) for w in written] == [
        ("jrc_synth1.zarr", "crop9001"),
        ("jrc_synth2.zarr", "crop9002"),
    ]
    assert all(
        zarr.open_group(str(w.path / "nuc"), mode="r").attrs["csc_prediction"]["orthoplanes"]
        for w in written[:1]
    )  # the toolkit's default for a 2D model
    done = csc.process(config, crops="test", input_path=out, manifest=manifest, progress=False)
    assert [p.name for p in done] == ["crop9001", "crop9002"]


def test_test_crops_stream_their_raw_from_s3(
    s3_env: str, s3_synth: str, tiny_synth: Path, tmp_path: Path
) -> None:
    """With use_s3 and no datasplit CSV, a test crop's raw is search_path inside the bucket."""
    config = tiny_config_file(tiny_synth, tmp_path)
    text = config.read_text().replace(f"search_path = '{tiny_synth}/{SEARCH}'", "")
    config.write_text(text + f"use_s3 = True\ns3_bucket = '{s3_synth}-public'\n")
    (tmp_path / "datasplit.csv").unlink()
    manifest = write_manifest(tmp_path / "manifest.csv", TINY_ROWS[2:])
    written = predict(
        str(config), test_crops=True, manifest=manifest, checkpoint="latest", progress=False
    )
    assert written[0].region.raw_group == (
        f"s3://{s3_synth}-public/jrc_synth2/jrc_synth2.zarr/recon-1/em/fibsem-uint8"
    )
    assert crop_groups(tmp_path / "predictions") == ["jrc_synth2.zarr/crop9002"]
    missing = write_manifest(
        tmp_path / "missing.csv", [(9009, "jrc_none", "er", *TINY_ROWS[2][3:])]
    )
    with pytest.raises(FileNotFoundError, match=r"no raw at s3://.*-public/jrc_none/jrc_none.zarr"):
        predict(str(config), test_crops=True, manifest=missing, progress=False)
