"""What training records besides its losses: training-side metrics, the per-batch scalars every
`log_every_n_steps`, validation every `validate_every_n_steps`, the run record (versions, git
commit, machine, config) in TensorBoard and beside the checkpoints, `deterministic` and
`debug`. Real runs on tiny synthetic data; the event files and JSON are read back."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import csc
from csc.checkpoints import run_records, save_run_record
from csc.config import TrainConfig, build_config, load_config
from csc.metrics import METRIC_NAMES, SegmentationMetrics
from csc.reproducibility import deterministic_mode, git_state, run_record
from csc.tracking import read_scalars, validation_by_epoch
from csc.training import setup, train, train_step
from tests.test_train import CLASSES, config_of, data, settings

__all__ = ["data"]  # the module's synthetic data fixture, shared with test_train

LOGS = "tensorboard/2d_unet"


def texts(log_dir: Path, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a TensorBoard text tag, by step."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    events = accumulator.Tensors(f"{tag}/text_summary")
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events]


def tags(log_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


# --- Training-side metrics -----------------------------------------------------------------


def test_training_metrics_are_logged_per_epoch_beside_validations(
    data: Path, tmp_path: Path
) -> None:
    train(config_of(data, tmp_path))
    log = tmp_path / LOGS
    for metric in METRIC_NAMES:
        steps = [step for step, _ in read_scalars(log, f"train/{metric}/mean")]
        if metric == "boundary_f1":  # validation's only: 3/4 of the counts' cost
            assert steps == [] and "metrics/boundary_f1/mean" in tags(log)
            continue
        assert steps == [3, 6], metric  # once per epoch, at its last batch
    per_class = {f"train/iou/{name}" for name in CLASSES}
    assert per_class <= tags(log)
    for tag in per_class:
        assert all(0 <= value <= 1 for _, value in read_scalars(log, tag))
    # Validation's tags stay as they were, next to them.
    assert [step for step, _ in read_scalars(log, "metrics/iou/mean")] == [3, 6]


def test_training_metrics_count_the_batches_the_model_trained_on(
    data: Path, tmp_path: Path
) -> None:
    """The counts after two steps equal SegmentationMetrics over the logits the model gave
    each batch before its update (train mode: BatchNorm's batch statistics, as in the step)."""
    run = setup(config_of(data, tmp_path))
    assert run.train_metrics is not None
    expected = SegmentationMetrics(CLASSES, boundary_tolerance=None)
    for batch in itertools.islice(iter(run.loaders.train), 2):
        with torch.no_grad():
            expected.update(run.model(batch["input"]), batch["output"])
        train_step(run, batch, step_now=True)
    run.tracker.close()
    assert torch.equal(run.train_metrics.counts, expected.counts)
    assert int(expected.counts[:4].sum()) > 0


def test_training_metrics_can_be_turned_off(data: Path, tmp_path: Path) -> None:
    train(config_of(data, tmp_path, train_metrics=False, epochs=1))
    logged = tags(tmp_path / LOGS)
    assert not any(tag.startswith("train/") for tag in logged)
    assert "metrics/iou/mean" in logged and "loss" in logged


def test_sampling_shares_are_the_batches_own_with_and_without_training_metrics(
    data: Path, tmp_path: Path
) -> None:
    """sampling/{class} is the share of the epoch's annotated voxels that are foreground:
    taken from the training metrics' counts when they are on, counted by train_step when they
    are off; the same figures, those of the batches themselves."""
    logged = {}
    for metrics_on in (True, False):
        folder = tmp_path / f"metrics_{metrics_on}"
        train(config_of(data, folder, train_metrics=metrics_on, epochs=1))
        log = folder / LOGS
        logged[metrics_on] = [read_scalars(log, f"sampling/{name}")[0][1] for name in CLASSES]
    run = setup(config_of(data, tmp_path / "expected"))
    run.tracker.close()
    run.loaders.sampler.set_epoch(1)
    targets = torch.cat([batch["output"] for batch in run.loaders.train])  # (B, C, Y, X)
    axes = (0, 2, 3)
    shares = (targets == 1).sum(axes) / targets.isfinite().sum(axes).clamp(min=1)
    assert logged[True] == logged[False]
    assert logged[True] == pytest.approx(shares.tolist(), rel=1e-6)
    assert 0 < max(logged[True]) < 1


# --- Cadences ------------------------------------------------------------------------------


def test_log_every_n_steps_thins_the_per_batch_scalars(data: Path, tmp_path: Path) -> None:
    train(config_of(data, tmp_path, log_every_n_steps=2, epochs=2, iterations_per_epoch=3))
    log = tmp_path / LOGS
    assert [step for step, _ in read_scalars(log, "loss")] == [2, 4, 6]
    # Per-epoch scalars are not thinned.
    assert [step for step, _ in read_scalars(log, "validation")] == [3, 6]
    # A resumed run goes on counting the same steps: 8 and 10 of epochs 3 and 4 (7..12).
    train(config_of(data, tmp_path, log_every_n_steps=2, epochs=2, iterations_per_epoch=3))
    assert [step for step, _ in read_scalars(log, "loss")] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize(
    ("every", "accumulation", "steps"),
    [
        # 3 optimizer steps per epoch; the 2nd and 4th of the run come before an epoch's end.
        (2, 1, [2, 3, 4, 6]),
        # Steps after batches 2 and 3 of each epoch (the last batch always steps): every one.
        (1, 2, [2, 3, 5, 6]),
    ],
)
def test_validate_every_n_steps_validates_mid_epoch_and_best_stays_per_epoch(
    data: Path, tmp_path: Path, every: int, accumulation: int, steps: list[int]
) -> None:
    config = config_of(
        data, tmp_path, validate_every_n_steps=every, gradient_accumulation_steps=accumulation
    )
    result = train(config)
    log = tmp_path / LOGS
    assert [step for step, _ in read_scalars(log, "validation")] == steps
    assert [step for step, _ in read_scalars(log, "metrics/iou/mean")] == steps
    # The epochs' own validations alone decide the best epoch.
    assert len(result.validation) == 2
    by_epoch = validation_by_epoch(log)
    assert list(by_epoch) == [1, 2]
    epoch_losses = [scores["loss"] for scores in result.validation]
    assert list(by_epoch.values()) == pytest.approx(epoch_losses)
    assert result.best_score == pytest.approx(min(epoch_losses), rel=1e-6)  # stored as float32
    assert result.best_epoch == 1 + epoch_losses.index(min(epoch_losses))


# --- The run record ------------------------------------------------------------------------


def git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    return subprocess.run([*command, *args], check=True, capture_output=True, text=True).stdout


def write_config_file(folder: Path, values: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.py"
    path.write_text("\n".join(f"{key} = {value!r}" for key, value in values.items()) + "\n")
    return path


def test_the_run_record_holds_versions_commit_machine_and_config(
    data: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "experiment"
    config_path = write_config_file(repository, settings(data, tmp_path, epochs=1))
    git(repository, "init", "-q")
    git(repository, "add", "config.py")
    git(repository, "commit", "-q", "-m", "the experiment")
    commit = git(repository, "rev-parse", "HEAD").strip()

    train(config_path)
    [path] = run_records(str(tmp_path / "checkpoints/{model_name}_{epoch}.pth"), "2d_unet")
    assert path.parent == tmp_path / "checkpoints/csc-extras"
    record = json.loads(path.read_text())
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["csc"] == csc.__version__
    assert {"numpy", "tensorstore", "zarr", "python"} <= set(record["versions"])
    assert all(record["versions"][name] for name in ("numpy", "tensorstore", "zarr"))
    assert record["git"]["config"] == {
        "commit": commit,
        "dirty": False,
        "root": str(repository.resolve()),
    }
    machine = record["machine"]
    assert machine["device"] == "cpu" and machine["cpu_count"] == os.cpu_count()
    assert machine["cuda"] == torch.version.cuda and machine["hostname"]
    assert record["config"]["epochs"] == 1 and record["config"]["classes"] == list(CLASSES)
    assert record["config"]["config_path"] == str(config_path)
    assert record["resumed_from"] == {"epoch": 0, "global_step": 0}
    assert record["loaded_from"] is None
    [(step, text)] = texts(tmp_path / LOGS, "run_record")
    assert step == 0 and commit in text and f"torch {torch.__version__}" in text

    # A changed config resumes: a second record beside the first (which stays as it was),
    # saying where it resumed and that the folder has uncommitted changes.
    first = path.read_text()
    with config_path.open("a") as file:
        file.write("# one more epoch\n")
    train(config_path)
    paths = run_records(str(tmp_path / "checkpoints/{model_name}_{epoch}.pth"), "2d_unet")
    assert len(paths) == 2 and paths[0] == path and path.read_text() == first
    again = json.loads(paths[1].read_text())
    assert again["resumed_from"] == {"epoch": 1, "global_step": 3}
    assert again["loaded_from"] == str(tmp_path / "checkpoints/2d_unet_1.pth")
    assert again["git"]["config"]["commit"] == commit and again["git"]["config"]["dirty"]
    assert [step for step, _ in texts(tmp_path / LOGS, "run_record")] == [0, 3]


def test_no_git_repository_or_no_git_is_recorded_as_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = build_config({"device": "cpu"}, config_dir=tmp_path, config_path=tmp_path / "c.py")
    assert git_state(tmp_path) is None  # a folder in no repository
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git executable at all
    assert git_state(Path(__file__).parent) is None
    record = run_record(config, device=torch.device("cpu"))
    assert record["git"] == {"config": None, "csc": None}
    assert record["versions"]["torch"] == torch.__version__
    json.dumps(record)  # plain data


# --- deterministic -------------------------------------------------------------------------

SEEN_FLAGS: list[bool] = []


def note_determinism(raw: torch.Tensor) -> torch.Tensor:
    """A raw transform that notes whether torch is in deterministic mode as the run reads."""
    SEEN_FLAGS.append(torch.are_deterministic_algorithms_enabled())
    return raw.float() / 255


def test_two_deterministic_runs_give_identical_losses(data: Path, tmp_path: Path) -> None:
    SEEN_FLAGS.clear()
    runs = [
        train(
            config_of(
                data,
                tmp_path / name,
                deterministic=True,
                train_raw_value_transforms=note_determinism,
            )
        )
        for name in ("a", "b")
    ]
    assert runs[0].losses == runs[1].losses and all(math.isfinite(x) for x in runs[0].losses)
    for name, value in runs[0].model.state_dict().items():
        assert torch.equal(runs[1].model.state_dict()[name], value), name
    assert SEEN_FLAGS and all(SEEN_FLAGS)  # on during the runs
    assert not torch.are_deterministic_algorithms_enabled()  # and torch's own again after
    [record] = run_records(str(tmp_path / "a/checkpoints/{model_name}_{epoch}.pth"), "2d_unet")
    assert json.loads(record.read_text())["deterministic"] is True


def test_deterministic_mode_sets_and_restores_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    with deterministic_mode("warn"):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark == benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_mode(True):
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()


# --- debug ---------------------------------------------------------------------------------


def test_debug_prints_shapes_ranges_and_timings_of_the_first_batches(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(config_of(data, tmp_path, debug=2, epochs=1))
    out = capsys.readouterr().out
    reports = [line for line in out.splitlines() if line.startswith("debug: step")]
    assert [line.split(":")[1].strip() for line in reports] == ["step 1", "step 2"]
    for phase in ("data wait", "to device", "forward", "metrics", "backward", "step"):
        assert f"{phase} " in reports[0] and " ms" in reports[0], phase
    assert "input  (2, 1, 32, 32) float32 cpu min " in out
    assert "target (2, 3, 32, 32) float32 cpu min 0 mean " in out and " max 1, NaN " in out
    assert "logits (2, 3, 32, 32) float32 cpu" in out


def test_without_debug_nothing_is_reported(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(config_of(data, tmp_path, epochs=1, iterations_per_epoch=1))
    assert "debug:" not in capsys.readouterr().out


# --- Config checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_metrics", "yes", "train_metrics must be True or False"),
        ("log_every_n_steps", 0, "log_every_n_steps must be an integer >= 1"),
        ("validate_every_n_steps", 0, "validate_every_n_steps must be an integer >= 1"),
        ("deterministic", "strict", "deterministic must be True, False or 'warn'"),
        ("debug", 0, "debug must be True"),
        ("debug", "all", "debug must be True"),
    ],
)
def test_bad_values_name_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config({key: value})


def test_defaults() -> None:
    config = TrainConfig()
    assert config.train_metrics is True and config.log_every_n_steps == 1
    assert config.validate_every_n_steps is None
    assert config.deterministic is False and config.debug is False
    assert build_config({"deterministic": "warn", "debug": True}).debug is True


def test_a_config_file_sets_the_keys(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, {"log_every_n_steps": 10, "validate_every_n_steps": 500})
    config = load_config(path)
    assert (config.log_every_n_steps, config.validate_every_n_steps) == (10, 500)


def test_records_in_the_same_second_keep_their_order(tmp_path: Path) -> None:
    template = str(tmp_path / "{model_name}_{epoch}.pth")
    paths = [save_run_record({"n": n}, template=template, model_name="m") for n in range(3)]
    assert run_records(template, "m") == paths
    assert [json.loads(path.read_text())["n"] for path in paths] == [0, 1, 2]
    assert run_records(template, "other") == []
