"""Data-parallel training with real torchrun processes on the gloo backend: ranks draw different
patches, rank 0 alone logs and saves, validation metrics reduced over ranks equal a single
process's over the same tiles, resume, and a failing rank ending the run with its error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from csc.config import load_config
from csc.data.loaders import build_datasets, default_loader_kwargs
from csc.datasplit import ensure_datasplit
from csc.synth import SynthSpec, write_synthetic
from csc.training import resume, setup, validate

CLASSES = ("nuc", "mito", "er")
SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
TORCHRUN = Path(sys.executable).parent / "torchrun"
# The config's model: a small UNet that writes a digest of every training patch it sees to
# seen/rank{RANK}.txt, and raises on its second training batch on the rank named FAIL_RANK.
MODEL = """
import hashlib, os
from pathlib import Path
from csc.models import UNet

class Recording(UNet):
    batches = 0

    def forward(self, x):
        if self.training:
            rank = os.environ.get("RANK", "0")
            Recording.batches += 1
            if rank == os.environ.get("FAIL_RANK") and Recording.batches == 2:
                raise RuntimeError(f"rank {rank} broke on purpose")
            with open(Path(SEEN) / f"rank{rank}.txt", "a") as seen:
                for patch in x:
                    seen.write(hashlib.sha1(patch.detach().numpy().tobytes()).hexdigest() + "\\n")
        return super().forward(x)

model = Recording(2, 1, 3, base_channels=4, num_levels=2)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-data")
    write_synthetic(out, SPEC)
    return out


def write_config(data: Path, run: Path, **overrides: Any) -> Path:
    """A tiny 2D run of the recording model; all tiles of the validation crops."""
    info = {"shape": (1, 32, 32), "scale": (8, 8, 8)}
    settings = {
        "search_path": f"{data}/{SEARCH}",
        "datasplit_path": f"{run}/datasplit.csv",
        "classes": CLASSES,
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "recording",
        "model_to_load": "recording",
        "epochs": 2,
        "iterations_per_epoch": 3,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "device": "cpu",
        "SEEN": str(run / "seen"),
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        **overrides,
    }
    (run / "seen").mkdir(parents=True, exist_ok=True)
    path = run / "config.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in settings.items()) + "\n" + MODEL)
    return path


def torchrun(
    config: Path, *arguments: str, fail_rank: int | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node=2 -m csc train CONFIG ...` on CPU (gloo), on a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fail_rank is not None:
        env["FAIL_RANK"] = str(fail_rank)
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "csc",
        "train",
        str(config),
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def seen(run: Path, rank: int) -> list[str]:
    return (run / "seen" / f"rank{rank}.txt").read_text().split()


def scalars(log_dir: Path) -> dict[str, list[Any]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_two_ranks_train_log_once_reduce_validation_and_resume(data: Path, tmp_path: Path) -> None:
    config = write_config(data, tmp_path)
    done = torchrun(config)
    assert done.returncode == 0, done.stdout + done.stderr

    # Each rank trained on its own patches: 2 epochs x 3 batches x 2, none shared.
    first, second = seen(tmp_path, 0), seen(tmp_path, 1)
    assert len(first) == len(second) == 12
    assert not set(first) & set(second)
    # One writer: one event file, one set of checkpoints, one line per epoch.
    log_dir = tmp_path / "tensorboard/recording"
    assert len(list(log_dir.iterdir())) == 1
    folder = tmp_path / "checkpoints"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    expected = ["recording_1.pth", "recording_2.pth"]
    expected += [f"csc-extras/recording_{e}.state.pth" for e in ("1", "2")]
    [record] = [name for name in names if name.startswith("csc-extras/recording_run-")]
    assert names == sorted([*expected, "csc-extras/recording_best.pth", record])  # best: a link
    assert done.stdout.count("epoch 1: training loss") == 1
    assert done.stdout.count("trained epochs 1-2") == 1
    assert "samples/s" in done.stdout and "waiting for data" in done.stdout

    # Reduced metrics equal one process's over the same tiles, with the epoch-2 weights.
    logged = scalars(log_dir)
    # Training metrics from counts summed over both ranks, once per epoch by rank 0.
    assert [e.step for e in logged["train/iou/mean"]] == [3, 6]
    torch.set_num_threads(1)  # as each rank ran: the same arithmetic, the same logits
    single = load_config(config, [f"logs_save_path={str(tmp_path / 'single')!r}"])
    run = setup(single)
    assert resume(run) == 2
    scores = validate(run, 2)
    run.tracker.close()
    assert scores is not None
    compared = 0
    for name, per_class in scores["metrics"].items():
        if not isinstance(per_class, dict):
            continue
        for label, value in per_class.items():
            tag = f"metrics/{name}/{label}"
            assert (tag in logged) == (value is not None), tag
            if value is not None:
                assert logged[tag][-1].value == pytest.approx(value, abs=1e-6), tag
                compared += 1
    assert compared >= 8
    assert logged["validation"][-1].value == pytest.approx(scores["loss"], rel=0.05)

    # Resume: every rank loads epoch 2's state and the run goes on at epoch 3.
    again = torchrun(config, "epochs=1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout and "recording_2.pth: epoch 2" in again.stdout
    assert again.stdout.count("epoch 3: training loss") == 1
    assert (tmp_path / "checkpoints/recording_3.pth").is_file()
    assert len(seen(tmp_path, 0)) == len(seen(tmp_path, 1)) == 18
    assert not set(seen(tmp_path, 0)[12:]) & set(first + second)  # epoch 3's own patches


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_error(data: Path, tmp_path: Path) -> None:
    config = write_config(data, tmp_path)
    env = {**os.environ, "FAIL_RANK": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "csc", "train", str(config), "--nproc", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "csc: rank 1 of 2 failed" in output
    assert "RuntimeError: rank 1 broke on purpose" in output
    assert seconds < 90, f"took {seconds:.0f} s to stop"  # start-up ~10 s; a hang is minutes
    # No checkpoint: only the record of the start (versions, machine, config) is there.
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("checkpoints/**/*.*")]
    assert len(written) == 1 and written[0].startswith("checkpoints/csc-extras/recording_run-")


def test_loader_defaults_follow_the_device_and_the_cores() -> None:
    gpu = default_loader_kwargs("cuda", processes_per_machine=4, cpu_count=32)
    assert gpu == {"num_workers": 7, "pin_memory": True, "prefetch_factor": 4}
    assert default_loader_kwargs("cuda", processes_per_machine=2, cpu_count=2) == {
        "num_workers": 0,
        "pin_memory": True,
    }
    assert default_loader_kwargs("cpu", cpu_count=2) == {"num_workers": 0}
    assert default_loader_kwargs("cpu", cpu_count=32) == {"num_workers": 4}


def test_validation_tiles_are_split_over_ranks_once(data: Path, tmp_path: Path) -> None:
    config = load_config(write_config(data, tmp_path))
    ensure_datasplit(config)
    whole = build_datasets(config)[1]
    shares = [build_datasets(config, rank=r, world_size=3)[1] for r in range(3)]
    assert whole is not None and all(share is not None for share in shares)
    keys = sorted(int(k) for share in shares for k in share.keys)  # type: ignore[union-attr]
    assert keys == list(range(len(whole))) and len(whole) >= 6
    for share in shares:
        for index, key in enumerate(share.keys):  # type: ignore[union-attr]
            assert (share.centres[index] == whole.centres[key]).all()  # type: ignore[union-attr]


@pytest.mark.slow
def test_two_ranks_train_with_spatial_transforms_on_the_device(data: Path, tmp_path: Path) -> None:
    """Under torchrun, loaders that ship boxes (resampled in each rank's training process)
    give each rank its own patches, as many as the CPU path, none shared."""
    config = write_config(data, tmp_path, epochs=1, spatial_transforms_on_device=True)
    done = torchrun(config)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = seen(tmp_path, 0), seen(tmp_path, 1)
    assert len(first) == len(second) == 6
    assert not set(first) & set(second)
