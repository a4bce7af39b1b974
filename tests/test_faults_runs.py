"""Faults of training runs: a fresh start beside another run, a stale best copy, orphan temporary
files, duplicate TensorBoard steps after a resume, disk use, and a checkpoint write that fails
(a real EFBIG from RLIMIT_FSIZE) or a destination that cannot be a folder."""

from __future__ import annotations

import contextlib
import hashlib
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from csc.checkpoints import CheckpointWarning, RunWriteError, best_epoch, start_run, state_path
from csc.cli import cli
from csc.config import build_config
from csc.synth import SynthSpec, write_synthetic
from csc.tracking import EPOCH_TAG, read_scalars, validation_by_epoch
from csc.training import train
from tests.faults import assert_unchanged, snapshot

CLASSES = ("nuc", "mito")
SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
ITERATIONS = 2  # batches per epoch: epoch e ends at step 2e


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs-data")
    write_synthetic(out, SPEC)
    return out


def settings(data: Path, run: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny 2D run: (1, 32, 32) patches, a 2-level UNet 8 channels wide."""
    info = {"shape": (1, 32, 32), "scale": (8, 8, 8)}
    return {
        "search_path": f"{data}/{SEARCH}",
        "datasplit_path": f"{run}/datasplit.csv",
        "classes": CLASSES,
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "2d_unet",
        "model_to_load": "2d_unet",
        "model_kwargs": {"num_levels": 2, "base_channels": 8},
        "epochs": 3,
        "iterations_per_epoch": ITERATIONS,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "validation_batch_limit": 1,
        "device": "cpu",
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        **overrides,
    }


def write_config(data: Path, run: Path, **overrides: Any) -> Path:
    path = run / "config.py"
    lines = [f"{key} = {value!r}" for key, value in settings(data, run, **overrides).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def old_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of epochs 1-3 (checkpoints, TensorBoard logs, datasplit); tests copy it."""
    run = tmp_path_factory.mktemp("old-run")
    train(build_config(settings(data, run)))
    return run


@pytest.fixture
def run(old_run: Path, tmp_path: Path) -> Path:
    """A copy of `old_run` to change (copies, not links: `best` is its own file here)."""
    copy = tmp_path / "run"
    shutil.copytree(old_run, copy)
    return copy


def csc_train(config: Path, *overrides: str) -> Result:
    return CliRunner().invoke(cli, ["train", str(config), *overrides])


def error_line(result: Result) -> str:
    """The one-line error of a failed command (click prints `Error: ...`), no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. A fresh start never overwrites or mixes with another run ---------------------------


def fine_tune_source(run: Path) -> list[str]:
    """Weights of another model to fine-tune from, beside the old run."""
    shutil.copy(run / "checkpoints/2d_unet_3.pth", run / "checkpoints/source_3.pth")
    return ["model_to_load=source"]


def without_checkpoints(run: Path) -> list[str]:
    """Logs of a run whose checkpoints are gone: 'latest' finds nothing to resume."""
    shutil.rmtree(run / "checkpoints")
    return []


def without_logs(run: Path) -> list[str]:
    """Checkpoints without validation logs: 'best' finds no epoch to load."""
    shutil.rmtree(run / "tensorboard")
    return ["load_model='best'"]


@pytest.mark.parametrize(
    ("prepare", "folders", "reason"),
    [
        (
            lambda run: ["load_model=None"],
            ("checkpoints", "tensorboard/2d_unet"),
            "load_model=None",
        ),
        (fine_tune_source, ("checkpoints", "tensorboard/2d_unet"), "weights of source"),
        (without_logs, ("checkpoints",), "nothing of 2d_unet to resume (load_model='best')"),
    ],
    ids=["load_model-None", "fine-tune", "best-finds-nothing"],
)
def test_a_fresh_start_beside_another_run_refuses_before_reading_data(
    data: Path, run: Path, prepare: Any, folders: tuple[str, ...], reason: str
) -> None:
    """The issue's repro and its relatives: nothing written, the old run byte-identical, one
    line naming the folders and the ways out; the datasplit is not even built."""
    overrides = prepare(run)
    (run / "datasplit.csv").unlink()
    config = write_config(data, run)
    before = snapshot(run)
    line = error_line(csc_train(config, "epochs=1", *overrides))
    assert all(str(run / folder) in line for folder in folders), line
    assert reason in line and "existing_run='move'" in line and "model_name" in line
    assert snapshot(run) == before  # nothing changed, nothing added
    assert not (run / "datasplit.csv").exists()


def test_a_fresh_start_can_move_the_old_run_aside_whole(data: Path, run: Path) -> None:
    """existing_run='move': the old checkpoints and logs keep their bytes in *.moved-* folders;
    the new run's latest, best and logs are its own."""
    before = snapshot(run)
    result = csc_train(
        write_config(data, run), "epochs=1", "load_model=None", "existing_run='move'"
    )
    assert result.exit_code == 0, result.output
    assert "moved the previous run of 2d_unet aside" in result.output
    [moved_checkpoints] = (run / "checkpoints").glob("2d_unet.moved-*")
    [moved_logs] = (run / "tensorboard").glob("2d_unet.moved-*")
    for name, sha in before.items():
        if name.startswith("checkpoints/"):
            assert digest(moved_checkpoints / name.split("/", 1)[1]) == sha, name
        elif name.startswith("tensorboard/2d_unet/"):
            assert digest(moved_logs / name.split("/", 2)[2]) == sha, name
        else:
            assert digest(run / name) == sha, name
    names = sorted(p.name for p in (run / "checkpoints").glob("2d_unet_*"))
    assert names == ["2d_unet_1.pth"]
    extras = sorted(p.name for p in (run / "checkpoints/csc-extras").iterdir())
    # The old run's record moved with it (above); this run's own is its one record here.
    [record] = [name for name in extras if name.startswith("2d_unet_run-")]
    assert extras == sorted(["2d_unet_1.state.pth", "2d_unet_best.pth", record])
    assert (run / "checkpoints/csc-extras/2d_unet_best.pth").samefile(
        run / "checkpoints/2d_unet_1.pth"
    )
    assert len(list((run / "tensorboard/2d_unet").iterdir())) == 1
    assert [step for step, _ in read_scalars(run / "tensorboard/2d_unet", "loss")] == [1, 2]


def test_logs_without_checkpoints_are_moved_aside_whole(data: Path, run: Path) -> None:
    """A run stopped before its first epoch ended leaves logs only: rerunning moves them into a
    *.moved-* folder with a notice (bytes unchanged) instead of refusing or mixing with them."""
    without_checkpoints(run)
    before = snapshot(run)
    result = csc_train(write_config(data, run), "epochs=1")
    assert result.exit_code == 0, result.output
    assert "only its logs" in result.output and "moved the previous run of 2d_unet aside" in (
        result.output
    )
    [moved_logs] = (run / "tensorboard").glob("2d_unet.moved-*")
    for name, sha in before.items():
        if name.startswith("tensorboard/2d_unet/"):
            assert digest(moved_logs / name.split("/", 2)[2]) == sha, name
        else:
            assert digest(run / name) == sha, name
    assert [step for step, _ in read_scalars(run / "tensorboard/2d_unet", "loss")] == [1, 2]


def test_another_ranks_write_check_is_no_run_to_refuse_or_move(data: Path, tmp_path: Path) -> None:
    """Under torchrun rank 0 probes the log folder (a `.csc-write-check-*` file for a moment)
    while the other ranks start: a fresh run seeing such a file neither refuses nor moves it
    (CI once failed so: rank 1 saw rank 0's probe and refused the run)."""
    logs = tmp_path / "tensorboard/2d_unet"
    logs.mkdir(parents=True)
    probe = logs / ".csc-write-check-abc123"
    probe.write_bytes(b"csc")
    start = start_run(build_config(settings(data, tmp_path, load_model=None)), is_main=True)
    assert start.notes == [] and probe.read_bytes() == b"csc"
    assert list(logs.parent.iterdir()) == [logs]  # nothing moved aside


def test_only_rank_zero_refuses_a_fresh_start_beside_another_run(data: Path, run: Path) -> None:
    """Rank 0 writes, so it alone decides; the other ranks do not race it over folders it may
    be probing or moving, and leave the old run as it is."""
    before = snapshot(run)
    config = build_config(settings(data, run, load_model=None))
    start = start_run(config, is_main=False)
    assert start.resumed is None and start.notes == []
    with pytest.raises(FileExistsError, match="already hold a run of 2d_unet"):
        start_run(config, is_main=True)
    assert snapshot(run) == before


def test_resuming_the_best_epoch_refuses_to_overwrite_later_epochs(data: Path, run: Path) -> None:
    best = best_epoch(run / "tensorboard/2d_unet")
    assert best is not None
    folder = run / "checkpoints"
    for epoch_3 in (folder / "2d_unet_3.pth", state_path(folder / "2d_unet_3.pth")):
        shutil.copy(epoch_3, str(epoch_3).replace("_3.", "_4."))  # a later epoch than any best
    config = write_config(data, run)
    before = snapshot(run)
    line = error_line(csc_train(config, "epochs=1", "load_model='best'"))
    assert f"at epoch {best}" in line and str(run / "checkpoints") in line
    assert "epochs up to 4" in line and "load_model='latest'" in line
    assert snapshot(run) == before


# --- 2. and 3. What a killed run leaves: a stale best, temporary files -------------------


def test_a_stale_best_is_repaired_from_the_states_best_epoch(data: Path, run: Path) -> None:
    """A kill between epoch 3's checkpoint and its best link leaves `best` holding another
    epoch; the next start makes it the state's best epoch again. Nothing else changes."""
    folder = run / "checkpoints"
    best = torch.load(state_path(folder / "2d_unet_3.pth"), weights_only=True)["best_epoch"]
    other = next(e for e in (1, 2, 3) if e != best)
    best_file = folder / "csc-extras/2d_unet_best.pth"
    shutil.copy(folder / f"2d_unet_{other}.pth", best_file)  # stale
    before = snapshot(run)
    start = start_run(build_config(settings(data, run)))
    assert start.resumed is not None and start.resumed.epoch == 3
    assert any(f"{best_file} did not hold the best epoch" in n for n in start.notes), start.notes
    assert digest(best_file) == digest(folder / f"2d_unet_{best}.pth")
    changed = "checkpoints/csc-extras/2d_unet_best.pth"
    assert_unchanged({k: v for k, v in before.items() if k != changed}, run)


def test_orphan_temporary_files_of_the_run_are_removed_at_the_next_start(
    data: Path, run: Path
) -> None:
    folder = run / "checkpoints"
    orphans = [
        ".2d_unet_4.pth.1a2b3c4d.tmp",
        "csc-extras/.2d_unet_4.state.pth.deadbeef.tmp",
        "csc-extras/.2d_unet_best.pth.0badf00d.tmp",
        ".2d_unet_4.state.pth.deadbeef.tmp",  # where an earlier csc wrote them
        ".2d_unet_best.pth.0badf00d.tmp",
    ]
    kept = [
        ".other_4.pth.1a2b3c4d.tmp",
        ".2d_unet_4.pth.notcsc.tmp",
        "notes.tmp",
        ".2d_unet_4.pth.1a2b3c4d.tmp.keep",
    ]  # another model's, and not csc's names
    for name in orphans + kept:
        (folder / name).write_bytes(b"PK\x03\x04 half a checkpoint")
    before = snapshot(run)
    start = start_run(build_config(settings(data, run)))
    assert any("removed 5 temporary file(s)" in note for note in start.notes), start.notes
    assert sorted(p.name for p in folder.glob("*.tmp*")) == sorted(kept)
    assert not list(folder.glob("csc-extras/*.tmp*"))
    assert_unchanged({k: v for k, v in before.items() if Path(k).name not in orphans}, run)


# --- 4. No duplicate TensorBoard steps after a resume --------------------------------------


def test_a_resumed_run_hides_the_steps_the_killed_run_logged_after_its_checkpoint(
    data: Path, run: Path
) -> None:
    """The killed run had logged epochs 4 and 5 (steps 7-10) without saving them; the resumed
    run redoes epoch 4 (steps 7-8): both TensorBoard's reader and csc's see steps 1-8 once,
    the new values at 7-8, and epoch 5's validation is gone."""
    log_dir = run / "tensorboard/2d_unet"
    old_losses = dict(read_scalars(log_dir, "loss"))
    with SummaryWriter(str(log_dir)) as killed:  # what the killed process had flushed
        for step in range(7, 11):
            killed.add_scalar("loss", 100.0 + step, step)
        for epoch, step in ((4, 8), (5, 10)):
            killed.add_scalar("validation", -1.0, step)
            killed.add_scalar(EPOCH_TAG, epoch, step)
    result = train(build_config(settings(data, run, epochs=1)))
    assert (result.first_epoch, result.last_epoch) == (4, 4)
    loss = read_scalars(log_dir, "loss")
    assert [step for step, _ in loss] == list(range(1, 9))
    assert [value for _, value in loss[6:]] == pytest.approx(result.losses)
    assert [value for _, value in loss[:6]] == [old_losses[step] for step in range(1, 7)]
    assert list(validation_by_epoch(log_dir)) == [1, 2, 3, 4]
    assert validation_by_epoch(log_dir)[4] == pytest.approx(result.validation[0]["loss"])
    board = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    board.Reload()
    assert [event.step for event in board.Scalars("loss")] == list(range(1, 9))


def test_a_toolkit_checkpoint_without_state_resumes_its_weights_and_numbering(
    data: Path, tmp_path: Path
) -> None:
    """A plain state_dict at epoch 5 (the existing toolkit's layout, no state, no logs): its
    weights, then epoch 6, logged from step 5 * iterations + 1."""
    from csc.models import UNet

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    toolkit = UNet(2, 1, len(CLASSES), num_levels=2, base_channels=8)
    torch.save(toolkit.state_dict(), folder / "2d_unet_5.pth")
    before = snapshot(tmp_path)
    result = train(build_config(settings(data, tmp_path, epochs=1)))
    assert (result.first_epoch, result.last_epoch) == (6, 6)
    steps = [step for step, _ in read_scalars(tmp_path / "tensorboard/2d_unet", "loss")]
    assert steps == [5 * ITERATIONS + 1, 5 * ITERATIONS + 2]
    assert_unchanged(before, tmp_path)


def test_a_run_of_an_earlier_csc_resumes_and_its_files_move_into_csc_extras(
    data: Path, run: Path
) -> None:
    """csc before csc-extras kept training states and `best` beside the model files
    (2d_unet_3.state.pth, 2d_unet_best.pth), where the toolkit's latest loader reads "best"
    as an epoch: a resume reads them, continues at epoch 4 and moves them into csc-extras."""
    folder, extras = run / "checkpoints", run / "checkpoints/csc-extras"
    for path in extras.iterdir():
        path.rename(folder / path.name)  # the earlier layout
    extras.rmdir()
    moved = [*sorted(p.name for p in folder.glob("*.state.pth")), "2d_unet_best.pth"]
    result = csc_train(write_config(data, run), "epochs=1")
    assert result.exit_code == 0, result.output
    assert f"moved {len(moved)} training state / best file(s) of an earlier csc" in result.output
    steps = [step for step, _ in read_scalars(run / "tensorboard/2d_unet", "loss")]
    assert steps == list(range(1, 4 * ITERATIONS + 1))  # epoch 4 continues the run
    names = sorted(p.name for p in folder.glob("2d_unet_*.pth"))
    assert names == [f"2d_unet_{e}.pth" for e in (1, 2, 3, 4)]  # the toolkit's int() reads all
    records = {p.name for p in extras.glob("2d_unet_run-*.json")}  # this start's record
    assert {*moved, "2d_unet_4.state.pth", *records} >= {p.name for p in extras.iterdir()}
    assert (extras / "2d_unet_4.state.pth").is_file() and (extras / "2d_unet_best.pth").is_file()


# --- 5. Disk: full training states only where resume and best need them -------------------


def test_states_are_kept_for_the_last_two_epochs_and_best_only(old_run: Path) -> None:
    folder = old_run / "checkpoints"
    state = torch.load(state_path(folder / "2d_unet_3.pth"), weights_only=True)
    best = state["best_epoch"]
    assert state["model"] is None  # the weights are the model file's, not stored twice
    assert (folder / "csc-extras/2d_unet_best.pth").samefile(folder / f"2d_unet_{best}.pth")
    states = sorted(p.name for p in folder.glob("csc-extras/*.state.pth"))
    assert states == sorted({f"2d_unet_{e}.state.pth" for e in (2, 3, best)})
    assert sorted(p.name for p in folder.glob("2d_unet_[0-9].pth")) == [
        f"2d_unet_{e}.pth" for e in (1, 2, 3)
    ]


def test_prediction_from_a_state_file_uses_the_model_file_beside_it(
    data: Path, old_run: Path
) -> None:
    """The state holds no second copy of the weights: `csc predict --checkpoint X.state.pth`
    loads X.pth."""
    from csc.checkpoints import checkpoint_weights

    folder = old_run / "checkpoints"
    config = build_config(settings(data, old_run))
    weights, source = checkpoint_weights(config, str(state_path(folder / "2d_unet_3.pth")))
    assert source == str(folder / "2d_unet_3.pth")
    saved = torch.load(folder / "2d_unet_3.pth", weights_only=True)
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[name], saved[name]) for name in saved)


def test_a_corrupt_latest_falls_back_to_the_previous_state(data: Path, run: Path) -> None:
    latest = run / "checkpoints/2d_unet_3.pth"
    damaged = latest.read_bytes()[:100]
    latest.write_bytes(damaged)
    with pytest.warns(CheckpointWarning, match=r"2d_unet_3\.pth.*falling back"):
        start = start_run(build_config(settings(data, run, epochs=1)))
    assert start.resumed is not None and start.resumed.epoch == 2
    assert start.resumed.train_state is not None  # a full resume, not weights only
    assert start.resumed.train_state["global_step"] == 2 * ITERATIONS
    # The damaged epoch is not overwritten by its redo: its files are kept aside, bytes intact.
    assert not latest.exists() and any("2d_unet_3.pth" in note for note in start.notes)
    [kept] = (run / "checkpoints").glob("2d_unet_3.pth.damaged-*")
    assert kept.read_bytes() == damaged


# --- 6. Checkpoint writes that fail ---------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: a write past `limit` bytes fails with EFBIG (SIGXFSZ,
    which would kill the process, ignored), as a full disk fails it with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_write_that_fails_is_one_line_and_keeps_earlier_checkpoints(
    data: Path, run: Path
) -> None:
    """Epoch 4's training state is larger than the file size limit: the resumed run stops
    with one line naming that file; no partial file; epochs 1-3 byte-identical."""
    folder = run / "checkpoints"
    model_bytes = (folder / "2d_unet_3.pth").stat().st_size
    state_bytes = state_path(folder / "2d_unet_3.pth").stat().st_size
    assert state_bytes > 1.5 * model_bytes > 40_000  # room for the event file and the CSV
    config = write_config(data, run)
    before = snapshot(run)
    with file_size_limit((model_bytes + state_bytes) // 2):
        result = csc_train(config, "epochs=1")
    line = error_line(result)
    state_4 = state_path(folder / "2d_unet_4.pth")
    assert f"cannot write {state_4}: File too large" in line
    assert "earlier checkpoints are kept" in line
    assert not list(folder.rglob(".*.tmp")) and not state_4.exists()
    assert not (folder / "2d_unet_4.pth").exists()
    assert_unchanged(before, run)


@pytest.mark.parametrize("key", ["model_save_path", "logs_save_path"])
def test_a_destination_that_cannot_be_a_folder_is_refused_before_training(
    data: Path, tmp_path: Path, key: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    target = {
        "model_save_path": f"{blocker}/ckpt/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{blocker}/tb/{{model_name}}",
    }[key]
    config = write_config(data, tmp_path, **{key: target})
    before = snapshot(tmp_path)
    line = error_line(csc_train(config))
    assert f"{blocker} is a file, not a folder" in line and key in line
    assert_unchanged(before, tmp_path)
    assert not (tmp_path / "datasplit.csv").exists()  # refused before the data was looked at
    with pytest.raises(RunWriteError, match="blocker is a file"):
        start_run(build_config(settings(data, tmp_path, **{key: target})))


def test_resuming_with_another_optimizer_is_one_line_naming_the_state(
    data: Path, run: Path
) -> None:
    """The run was trained with RAdam; resuming it with SGD used to fail at the first step
    with KeyError 'momentum'. Now one line names the state file and the ways on."""
    before = snapshot(run)
    line = error_line(csc_train(write_config(data, run), "optimizer='sgd'"))
    assert str(run / "checkpoints/2d_unet_3.pth") in line and "SGD" in line, line
    assert "model_to_load='2d_unet'" in line
    assert_unchanged(before, run)


def test_every_checkpoint_damaged_is_one_line_and_keeps_them(data: Path, run: Path) -> None:
    """Each epoch file damaged: a warning per file (first line of torch's error only), then one
    line naming the checkpoints and the ways on; the damaged files stay as they were."""
    for path in (run / "checkpoints").glob("2d_unet_*.pth"):
        path.write_bytes(b"not a checkpoint")
    before = snapshot(run)
    result = csc_train(write_config(data, run))
    line = error_line(result)
    assert f"{run / 'checkpoints'}/2d_unet_{{epoch}}.pth can be read" in line, line
    assert "existing_run='move'" in line
    warned = [text for text in result.output.splitlines() if text.startswith("warning: cannot")]
    assert len(warned) == 3 and all("falling back to the previous epoch" in w for w in warned)
    assert_unchanged(before, run)
