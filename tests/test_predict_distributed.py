"""Prediction split over torchrun ranks (gloo, CPU): `csc predict --nproc 2` on a `csc synth`
volume's whole raw equals a one-process prediction voxel for voxel, pyramid included; a run
killed mid-way (a rank dies after a few blocks) and rerun predicts only the blocks it had not
recorded and ends with the same bytes; and the chunk grid tiles every block."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from csc.config import load_config
from csc.data.datasets import PatchSpec
from csc.datasplit import ensure_datasplit
from csc.distributed import Dist
from csc.prediction import (
    BLOCKS_DIR,
    EXIT_AFTER_ENV,
    block_box,
    block_count,
    chunk_shape,
    rank_blocks,
)
from csc.runtime import make_model
from csc.storage import blocks
from csc.synth import SynthSpec, write_synthetic

CLASSES = ("nuc", "mito", "er")
# Raw of 16 x 96 x 96 voxels at 8 nm (a pyramid s0, s1), predicted in blocks of 8 x 32 x 32:
# 2 * 3 * 3 = 18 blocks.
SPEC = SynthSpec(
    num_datasets=1,
    num_crops=1,
    shape=(16, 96, 96),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
BLOCK = (8, 32, 32)
BLOCKS = 18
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
DATASET = "jrc_synth1"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data, a config file of a small 2D UNet and its (untrained) weights."""
    root = tmp_path_factory.mktemp("predict-ddp")
    write_synthetic(root / "data", SPEC)
    info = {"shape": (1, 16, 16), "scale": (8, 8, 8)}
    settings: dict[str, Any] = {
        "search_path": f"{root}/data/{SEARCH}",
        "datasplit_path": f"{root}/datasplit.csv",
        "classes": CLASSES,
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "2d_unet",
        "model_kwargs": {"num_levels": 2, "base_channels": 4},
        "batch_size": 4,
        "device": "cpu",
        "prediction_block_shape": BLOCK,
        "model_save_path": f"{root}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{root}/tensorboard/{{model_name}}",
        "predictions_path": f"{root}/predictions",
    }
    path = root / "config.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in settings.items()) + "\n")
    config = load_config(path)
    ensure_datasplit(config, echo=lambda _: None)
    torch.manual_seed(0)
    spec = PatchSpec.from_arrays(config.input_array_info, config.target_array_info)
    weights = Path(config.model_save_path.format(model_name=config.model_name, epoch=1))
    weights.parent.mkdir(parents=True)
    torch.save(make_model(config, spec).state_dict(), weights)
    return root


def csc_predict(
    run: Path, output: Path, *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`csc predict CONFIG --dataset jrc_synth1 --output OUTPUT ...` (its whole raw) in a
    fresh process, one torch thread per process so one and two processes compute alike."""
    command = [sys.executable, "-m", "csc", "predict", str(run / "config.py")]
    command += ["--dataset", DATASET, "--output", str(output), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=300, check=False
    )


def arrays_of(output: Path) -> dict[str, np.ndarray]:
    """Every array written (each class's s0 and pyramid levels), by its path."""
    group = zarr.open_group(str(output / f"{DATASET}.zarr" / "raw"), mode="r")
    found = {}
    for name in CLASSES:
        for level, array in group[name].arrays():
            found[f"{name}/{level}"] = np.asarray(array[...])
    return found


def blocks_line(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    """(predicted, total, recorded earlier) from csc predict's closing line."""
    found = re.search(r"(\d+) of (\d+) blocks predicted, (\d+) already written", result.stdout)
    assert found, result.stdout + result.stderr
    predicted, total, recorded = (int(v) for v in found.groups())
    return predicted, total, recorded


@pytest.fixture(scope="module")
def single(run: Path) -> dict[str, np.ndarray]:
    """The one-process prediction of the whole raw."""
    result = csc_predict(run, run / "one")
    assert result.returncode == 0, result.stderr
    assert blocks_line(result) == (BLOCKS, BLOCKS, 0)
    return arrays_of(run / "one")


def test_blocks_are_split_over_ranks_once_and_chunks_tile_them() -> None:
    shares = [rank_blocks(BLOCKS, Dist(rank=r, world_size=3)) for r in range(3)]
    assert sorted(b for share in shares for b in share) == list(range(BLOCKS))
    assert shares[1][:3] == [1, 4, 7]
    shape, block = (10, 33, 64), (4, 16, 32)
    listed = list(blocks(shape, block))
    assert block_count(shape, block) == len(listed) == 3 * 3 * 2
    assert [block_box(shape, block, i) for i in range(len(listed))] == listed
    assert chunk_shape((16, 96, 96), BLOCK) == BLOCK
    assert chunk_shape((16, 1000, 1000), (64, 256, 192)) == (16, 64, 64)
    assert chunk_shape((600, 600, 600), (200, 160, 96)) == (50, 40, 48)
    with pytest.raises(ValueError, match=r"prediction_block_shape .* 97 voxels"):
        chunk_shape((400, 400, 400), (97, 64, 64))


@pytest.mark.slow
def test_two_processes_equal_one_voxel_for_voxel(run: Path, single: dict[str, np.ndarray]) -> None:
    result = csc_predict(run, run / "two", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert blocks_line(result) == (BLOCKS, BLOCKS, 0)
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports
    two = arrays_of(run / "two")
    assert sorted(two) == sorted(single) and len(two) > len(CLASSES)  # s0 and a pyramid
    for name, values in single.items():
        np.testing.assert_array_equal(two[name], values, err_msg=name)
    leftovers = [p.name for p in (run / "two" / f"{DATASET}.zarr").iterdir()]
    assert leftovers == ["raw"] or sorted(leftovers) == [".zattrs", ".zgroup", "raw"]


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_missing_blocks_only(
    run: Path, single: dict[str, np.ndarray]
) -> None:
    output = run / "killed"
    killed = csc_predict(run, output, "--nproc", "2", env={EXIT_AFTER_ENV: "1:2"})
    assert killed.returncode != 0
    assert not (output / f"{DATASET}.zarr" / "raw").exists()  # never under its real name
    records = sorted((output / f"{DATASET}.zarr" / ".raw.partial" / BLOCKS_DIR).glob("*.json"))
    # Rank 1 died after its 2nd block; rank 0 had written some of its own when it was stopped.
    assert 2 <= len(records) < BLOCKS
    ranks = {json.loads(path.read_text())["rank"] for path in records}
    assert 1 in ranks
    # A record is verified against the chunks: a recorded block missing one is predicted again.
    box = json.loads(records[0].read_text())["box"]
    key = "/".join(str(start // size) for (start, _), size in zip(box, BLOCK, strict=True))
    (output / f"{DATASET}.zarr" / ".raw.partial" / "mito" / "s0" / key).unlink()
    again = csc_predict(run, output, "--nproc", "2")
    assert again.returncode == 0, again.stderr
    assert blocks_line(again) == (BLOCKS - len(records) + 1, BLOCKS, len(records) - 1)
    resumed = arrays_of(output)
    for name, values in single.items():
        np.testing.assert_array_equal(resumed[name], values, err_msg=name)
    # Complete: a third run with the same weights and settings has nothing to do.
    done = csc_predict(run, output)
    assert done.returncode == 0 and blocks_line(done) == (0, BLOCKS, BLOCKS)
    # Another run's output is refused without --overwrite, as before.
    other = csc_predict(run, output, "--encoding", "float16")
    assert other.returncode != 0 and "predicted by another run" in other.stderr


def test_nproc_relaunches_with_the_options_as_typed(run: Path) -> None:
    """`csc predict --nproc N` starts N copies of the same command: every option given (csc's
    spelling, toolkit spellings included), the overrides, and no --nproc."""
    from csc.cli import _relaunch_arguments, cli

    command = cli.get_command(None, "predict")  # type: ignore[arg-type]
    assert command is not None
    typed = [str(run / "config.py"), "batch_size=2", "-c", "crop1", "--overlap", "0.5"]
    typed += ["--nproc", "2", "-O", "--encoding", "float16"]
    context = command.make_context("predict", typed)
    arguments = _relaunch_arguments(context, orthoplanes=True)
    assert arguments[:2] == [str(run / "config.py"), "batch_size=2"]
    assert "--nproc" not in arguments and "-O" not in arguments
    pairs = {a: b for a, b in zip(arguments, [*arguments[1:], ""], strict=True)}
    assert pairs["--crops"] == "crop1" and pairs["--overlap"] == "0.5"
    assert pairs["--encoding"] == "float16"
    assert {"--overwrite", "--orthoplanes"} <= set(arguments)
    relaunched = command.make_context("predict", arguments)
    assert {
        k: v for k, v in relaunched.params.items() if k not in ("nproc", "skip_orthoplanes")
    } == {
        **{k: v for k, v in context.params.items() if k not in ("nproc", "skip_orthoplanes")},
        "orthoplanes": True,
    }
