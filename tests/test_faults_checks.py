"""Faults of training that used to pass silently or come late: non-finite losses, held-back
warnings, a datasplit made for other classes, and config mistakes found only after the data was
crawled (shapes, device, keyword arguments, unwritable destinations). Each check names the key,
file or path, and leaves every file that existed byte-identical."""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from csc.checkpoints import RunWriteError
from csc.cli import cli
from csc.config import ConfigWarning, build_config
from csc.datasplit import ensure_datasplit
from csc.synth import write_synthetic
from csc.training import NonFiniteTrainingError, setup, train, train_step
from tests.faults import assert_unchanged, snapshot
from tests.test_train import SPEC, events, settings


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checks-data")
    write_synthetic(out, SPEC)
    return out


def saved_weights_finite(folder: Path) -> bool:
    """Every tensor of every saved model file finite (weights and BatchNorm statistics)."""
    files = [*folder.glob("*.pth"), *folder.glob("csc-extras/*_best.pth")]  # states: no weights
    weights = [torch.load(path, weights_only=True) for path in files]
    return all(v.isfinite().all() for w in weights for v in w.values() if v.is_floating_point())


class NaNEvery:
    """A raw value transform: [0, 1] scaling, and every `period`-th patch all NaN."""

    def __init__(self, period: int) -> None:
        self.period, self.calls = period, 0

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        scaled = raw.float() / 255
        return torch.full_like(scaled, math.nan) if self.calls % self.period == 0 else scaled


# --- 1. Non-finite losses ------------------------------------------------------------------


def test_a_diverging_run_stops_naming_the_key_and_the_causes(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sgd at learning_rate 1e20: every update after the first is skipped and counted, epoch 1
    ends (its weights finite, its NaN validation never the best), and the 4th skip in a row,
    in epoch 2, stops the run with one line."""
    before = snapshot(data)
    config = build_config(
        settings(data, tmp_path, optimizer="sgd", learning_rate=1e20, max_nonfinite_steps=4)
    )
    with pytest.raises(NonFiniteTrainingError) as error:
        train(config)
    message = str(error.value)
    assert message.startswith("training stopped in epoch 2 at batch 5: 4 optimizer steps in")
    assert "(max_nonfinite_steps = 4)" in message and "learning_rate 1e+20" in message
    assert "NaN or inf values in the raw data" in message and "\n" not in message
    skipped = [e.value for e in events(tmp_path / "tensorboard/2d_unet").Scalars("skipped_steps")]
    assert skipped == [1, 2, 2, 1, 2]  # per skip, and at the end of epoch 1
    out = capsys.readouterr().out
    assert "epoch 1: training loss" in out and "(2 steps skipped: non-finite loss" in out
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "2d_unet_1.pth").is_file() and saved_weights_finite(checkpoints)
    assert not list(checkpoints.glob("*best*"))
    assert not list(tmp_path.rglob(".csc-write-check-*"))  # the write checks' files are gone
    assert_unchanged(before, data)


@pytest.mark.parametrize("nan_first", [True, False], ids=["nan-then-finite", "finite-then-nan"])
def test_a_nan_batch_drops_the_accumulated_update_and_restores_batch_norm(
    data: Path, tmp_path: Path, nan_first: bool
) -> None:
    """Two accumulated batches, one with a NaN patch: no parameter or buffer changes, the
    gradients are dropped, the step is counted; the next clean pair updates the model."""
    run = setup(build_config(settings(data, tmp_path, gradient_accumulation_steps=2)))
    batches = iter(run.loaders.train)
    clean, poisoned = next(batches), next(batches)
    poisoned["input"][0] = math.nan
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    pair = (poisoned, clean) if nan_first else (clean, poisoned)
    losses = [train_step(run, pair[0], step_now=False), train_step(run, pair[1], step_now=True)]
    assert math.isnan(losses[0 if nan_first else 1])
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in run.model.parameters()) and not run.optimizer.state
    assert (run.skipped.in_epoch, run.skipped.in_a_row) == (1, 1)
    train_step(run, clean, step_now=False)
    train_step(run, next(batches), step_now=True)
    assert any(not torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    assert run.skipped.in_a_row == 0
    run.tracker.close()


def test_sporadic_nan_patches_are_skipped_and_the_best_model_is_finite(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every 5th training patch NaN (as from NaN in a float raw): the run finishes, the epoch
    line and TensorBoard count the skipped steps, every checkpoint is finite."""
    config = build_config(
        settings(data, tmp_path, iterations_per_epoch=6, train_raw_value_transforms=NaNEvery(5))
    )
    result = train(config)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("steps skipped: non-finite loss" in line for line in lines)
    assert "nan" not in lines[0].split("(")[0], lines  # the mean of the finite losses
    assert captured.err.count("non-finite loss or gradients; the update was skipped") == 2
    per_epoch = [e.value for e in events(tmp_path / "tensorboard/2d_unet").Scalars("skipped_steps")]
    assert per_epoch[-1] > 0 and result.best_epoch is not None
    assert math.isfinite(result.best_score)
    assert saved_weights_finite(tmp_path / "checkpoints")


def test_a_nan_validation_score_never_becomes_best(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN validation patches: no best epoch, no best file, and early stopping counts the
    epochs as without improvement (patience 2 stops after epoch 2 of 4)."""
    config = build_config(
        settings(
            data,
            tmp_path,
            epochs=4,
            early_stopping_patience=2,
            val_raw_value_transforms=NaNEvery(1),
        )
    )
    result = train(config)
    assert (result.last_epoch, result.best_epoch, result.best_score) == (2, None, None)
    assert not list((tmp_path / "checkpoints").glob("*best*"))
    assert capsys.readouterr().err.count("is not finite; best stays none yet") == 2


def test_fp16_scaler_steps_are_not_counted_as_skipped(data: Path, tmp_path: Path) -> None:
    """Under 16-mixed the gradient scaler skips inf-gradient steps itself (and lowers its
    scale); csc neither counts them nor breaks it, with clipping and accumulation."""
    options = {"precision": "16-mixed", "max_grad_norm": 1.0, "gradient_accumulation_steps": 2}
    result = train(build_config(settings(data, tmp_path, **options)))
    assert len(result.losses) == 6 and all(math.isfinite(loss) for loss in result.losses)
    log = events(tmp_path / "tensorboard/2d_unet")
    assert [e.value for e in log.Scalars("skipped_steps")] == [0, 0]


def test_an_overflowing_gradient_scaler_skips_on_its_own_uncounted(
    data: Path, tmp_path: Path
) -> None:
    """16-mixed with a scale so large that the scaled gradients overflow: the scaler skips
    the step (weights unchanged) and halves its scale; csc counts no skipped step."""
    run = setup(build_config(settings(data, tmp_path, precision="16-mixed")))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    before = {k: v.clone() for k, v in run.model.named_parameters()}
    loss = train_step(run, next(iter(run.loaders.train)), step_now=True)
    assert math.isfinite(loss) and run.scaler.get_scale() == 2.0**119
    assert all(torch.equal(v, before[k]) for k, v in run.model.named_parameters())
    assert (run.skipped.in_epoch, run.skipped.in_a_row) == (0, 0)
    run.tracker.close()


def test_max_nonfinite_steps_is_validated() -> None:
    with pytest.raises(ValueError, match=r"max_nonfinite_steps must be an integer >= 1, got 0"):
        build_config({"max_nonfinite_steps": 0})


# --- 2. Warnings when they happen ------------------------------------------------------------


@pytest.mark.slow
def test_a_config_warning_is_printed_before_data_is_read_and_survives_a_kill(
    data: Path, tmp_path: Path
) -> None:
    """`epoch = 5` in a config: 'did you mean epochs' is on stderr before the datasplit is
    crawled, in a run SIGKILLed right after the crawl (which used to lose it)."""
    before = snapshot(data)
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path, epochs=50).items()]
    config = tmp_path / "config.py"
    config.write_text("\n".join([*lines, "epoch = 5"]) + "\n")
    command = [sys.executable, "-m", "csc", "train", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and stderr in the order written
    merged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    with subprocess.Popen(command, env=env, **merged) as process:
        seen = lines_until(process, "wrote datasplit")
        os.kill(process.pid, signal.SIGKILL)
    warning = next(i for i, s in enumerate(seen) if "did you mean 'epochs'" in s)
    assert seen[warning].startswith(f"warning: config name 'epoch' in {config}")
    assert warning < len(seen) - 1 and seen[-1].startswith("wrote datasplit")
    assert process.returncode == -signal.SIGKILL
    assert_unchanged(before, data)


def lines_until(process: subprocess.Popen[str], start: str, timeout: float = 180) -> list[str]:
    """The process's output lines up to the first that begins with `start`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline and not any(s.startswith(start) for s in seen):
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
    return seen


# --- 3. A datasplit made for other classes ---------------------------------------------------


def test_a_datasplit_made_for_other_classes_is_refused_with_the_rebuild_command(
    data: Path, tmp_path: Path
) -> None:
    """A CSV crawled for nuc, er, then a config for nuc, mito, er: one line naming the CSV,
    mito and the csc datasplit command, which (run) writes a CSV the config accepts."""
    ensure_datasplit(build_config(settings(data, tmp_path, classes=("nuc", "er"))), echo=print)
    before = snapshot(tmp_path)
    config = build_config(settings(data, tmp_path))  # classes nuc, mito, er
    with pytest.raises(ValueError, match="made for other classes") as error:
        train(config)
    message = str(error.value)
    csv = tmp_path / "datasplit.csv"
    assert f"datasplit {csv} lists classes er, nuc" in message and "\n" not in message
    assert "no crop of it annotates mito" in message
    assert_unchanged(before, tmp_path)
    assert sorted(snapshot(tmp_path)) == sorted(before)  # nothing written: no logs, no crawl
    assert not (tmp_path / "checkpoints").exists()  # the write check leaves no folder behind
    command = message.split("`")[1]
    outcome = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert outcome.exit_code == 0, outcome.output
    assert ensure_datasplit(config) == csv
    assert "[nuc,mito,er]" in csv.read_text()


def test_a_datasplit_with_more_classes_serves_a_config_of_fewer(data: Path, tmp_path: Path) -> None:
    """Extra classes in the CSV are fine; a crop annotating none of the config's is not."""
    csv = ensure_datasplit(build_config(settings(data, tmp_path)), echo=print)
    assert ensure_datasplit(build_config(settings(data, tmp_path, classes=("er",)))) == csv
    first = csv.read_text().splitlines()[0]
    csv.write_text(csv.read_text().replace(first, first.replace("[nuc,mito,er]", "[nuc]")))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"1 of its 4 crops annotate none of them, e\.g\. "):
        ensure_datasplit(build_config(settings(data, tmp_path, classes=("er",))))
    assert_unchanged(before, tmp_path)


def test_a_fresh_crawl_missing_a_class_writes_no_csv(data: Path, tmp_path: Path) -> None:
    config = build_config(settings(data, tmp_path, classes=("nuc", "golgi")))
    with pytest.raises(ValueError, match=r"the crawl of .* no crop of it annotates golgi"):
        ensure_datasplit(config)
    assert not (tmp_path / "datasplit.csv").exists()


# --- 4. Checks before any data is read ------------------------------------------------------


def refused_before_data(
    data: Path, tmp_path: Path, expected: str, kind: type[Exception] = ValueError, **options: Any
) -> str:
    """The one-line error (a `kind` containing `expected`) of a config, which must come
    before the datasplit is crawled (no CSV written), with the data and every file under
    tmp_path unchanged."""
    before, before_data = snapshot(tmp_path), snapshot(data)
    with pytest.raises(kind, match=re.escape(expected)) as error:
        train(build_config(settings(data, tmp_path, **options)))
    assert not (tmp_path / "datasplit.csv").exists()
    assert_unchanged(before, tmp_path)
    assert_unchanged(before_data, data)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_docs_smaller_coarser_target_is_refused_naming_both_keys(
    data: Path, tmp_path: Path
) -> None:
    """docs/configuration.md's old example: a (1, 64, 64) target at 16 nm for a (1, 128, 128)
    input at 8 nm; and a target of the input's shape at another voxel size."""
    info = {"shape": (1, 128, 128), "scale": (8, 8, 8)}
    coarse = {"shape": (1, 64, 64), "scale": (16, 16, 16)}
    message = refused_before_data(
        data,
        tmp_path,
        "target_array_info shape (1, 64, 64) does not match the model's output",
        input_array_info=info,
        target_array_info=coarse,
    )
    assert "(128, 128) voxels per class for input_array_info (1, 128, 128)" in message
    shifted = {"shape": (1, 128, 128), "scale": (16, 16, 16)}
    refused_before_data(
        data,
        tmp_path,
        "target_array_info scale (16, 16, 16) differs from input_array_info",
        input_array_info=info,
        target_array_info=shifted,
    )


def test_a_model_with_the_wrong_number_of_outputs_is_refused(data: Path, tmp_path: Path) -> None:
    from csc.models import UNet

    model = UNet(2, 1, 2, num_levels=2, base_channels=4)  # 2 outputs for 3 classes
    expected = "needs (1, 3, ...): one channel per class of classes ['nuc', 'mito', 'er']"
    refused_before_data(data, tmp_path, expected, model=model)


@pytest.mark.parametrize("device", ["mps", f"cuda:{torch.cuda.device_count()}"])
def test_a_device_this_machine_lacks_is_one_line_naming_the_key(
    data: Path, tmp_path: Path, device: str
) -> None:
    message = refused_before_data(data, tmp_path, f"device {device!r}: ", device=device)
    assert message.startswith(f"device {device!r}: ") and "set device = None" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"scheduler": "step", "scheduler_kwargs": {"step_sise": 2}},
            "scheduler_kwargs: StepLR takes no argument 'step_sise'; it takes step_size, gamma",
        ),
        (
            {"scheduler": torch.optim.lr_scheduler.StepLR},
            "StepLR needs step_size: set it in scheduler_kwargs",
        ),
        (
            {"scheduler_kwargs": {"step_size": 2}},
            "scheduler_kwargs ['step_size'] need a scheduler name or class, but scheduler is None",
        ),
        (
            {"criterion": "dice", "criterion_kwargs": {"smoth": 0.5}},
            "criterion_kwargs: DiceLoss takes no argument 'smoth'; it takes smooth, fp_weight",
        ),
        (
            {"criterion": torch.nn.HuberLoss, "criterion_kwargs": {"detla": 0.5}},
            "criterion_kwargs: HuberLoss takes no argument 'detla'",
        ),
        (
            {"criterion": torch.nn.MSELoss, "criterion_kwargs": {"reduction": "sum"}},
            "criterion_kwargs: csc sets 'reduction' of a torch loss itself",
        ),
    ],
    ids=[
        "scheduler-typo",
        "scheduler-missing",
        "kwargs-without-scheduler",
        "loss-typo",
        "torch-loss-typo",
        "torch-loss-reduction",
    ],
)
def test_bad_scheduler_and_criterion_kwargs_name_the_key_and_the_valid_names(
    data: Path, tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    refused_before_data(data, tmp_path, expected, **options)


@pytest.mark.parametrize("key", ["model_save_path", "logs_save_path"])
def test_a_destination_behind_a_dangling_link_is_found_by_writing_before_the_crawl(
    data: Path, tmp_path: Path, key: str
) -> None:
    """A destination through a symlink to a place that is gone (an unmounted scratch disk):
    permissions look fine, the real write in `start_run` fails, one line names the key and
    folder before the datasplit is crawled; the link is left as it was."""
    link = tmp_path / "scratch"
    link.symlink_to(tmp_path / "unmounted" / "runs")
    template = "{model_name}_{epoch}.pth" if key == "model_save_path" else "{model_name}"
    expected = f"into {link}" if key == "model_save_path" else f"into {link}/2d_unet"
    message = refused_before_data(
        data, tmp_path, expected, RunWriteError, **{key: f"{link}/{template}"}
    )
    assert f"File exists ({link})" in message and f"set {key} to another folder" in message
    assert os.readlink(link) == str(tmp_path / "unmounted" / "runs")
    assert not (tmp_path / "unmounted").exists()


def test_csc_train_reports_a_failed_check_as_one_line(data: Path, tmp_path: Path) -> None:
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path, device="mps").items()]
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    outcome = CliRunner().invoke(cli, ["train", str(path)])
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output
    assert outcome.stderr.strip().startswith("Error: device 'mps': ")
    assert len(outcome.stderr.strip().splitlines()) == 1


def test_a_datasplit_for_another_raw_warns_with_the_rebuild_command(
    data: Path, tmp_path: Path
) -> None:
    """A CSV crawled for the uint8 raw, then a config whose raw_name names another array: the
    CSV decides what is read, so csc says so at start, with the command that rebuilds it."""
    csv = ensure_datasplit(build_config(settings(data, tmp_path)), echo=print)
    before = snapshot(tmp_path)
    config = build_config(settings(data, tmp_path, raw_name="em/fibsem-float32"))
    with pytest.warns(ConfigWarning) as caught:
        assert ensure_datasplit(config) == csv
    [message] = [str(w.message) for w in caught]
    assert f"datasplit {csv} reads raw from recon-1/em/fibsem-uint8" in message
    assert "raw_name 'em/fibsem-float32'" in message and "--raw-name 'em/fibsem-float32'" in message
    assert_unchanged(before, tmp_path)
