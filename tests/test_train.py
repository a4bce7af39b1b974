"""Training end to end on synthetic data: TensorBoard tags read back, checkpoints that load with
weights_only, exact resume, a SIGKILL mid-epoch, and the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from csc.cli import cli
from csc.config import TrainConfig, build_config
from csc.models import UNet
from csc.synth import SynthSpec, write_synthetic
from csc.tracking import EPOCH_TAG
from csc.training import train

CLASSES = ("nuc", "mito", "er")
# Crops of 16 x 64 x 64 label voxels at 4 nm: 8 x 32 x 32 at the patches' 8 nm.
SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train-data")
    write_synthetic(out, SPEC)
    return out


def settings(data: Path, run: Path, **overrides: Any) -> dict[str, Any]:
    """A tiny 2D run: (1, 32, 32) patches, a 2-level UNet 4 channels wide."""
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
        "model_kwargs": {"num_levels": 2, "base_channels": 4},
        "epochs": 2,
        "iterations_per_epoch": 3,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "validation_batch_limit": 2,
        "device": "cpu",
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        **overrides,
    }


def config_of(data: Path, run: Path, **overrides: Any) -> TrainConfig:
    return build_config(settings(data, run, **overrides))


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_a_run_logs_every_tag_and_saves_loadable_checkpoints(data: Path, tmp_path: Path) -> None:
    result = train(config_of(data, tmp_path))
    assert (result.first_epoch, result.last_epoch) == (1, 2) and len(result.losses) == 6
    log = events(tmp_path / "tensorboard/2d_unet")
    scalars = set(log.Tags()["scalars"])
    expected = {
        "loss",
        "validation",
        "lr",
        EPOCH_TAG,
        "perf/samples_per_s",
        "perf/data_wait_fraction",
    }
    expected |= {f"sampling/{name}" for name in CLASSES}
    for metric in ("iou", "dice", "precision", "recall", "accuracy", "boundary_f1"):
        expected.add(f"metrics/{metric}/mean")
    assert expected <= scalars, expected - scalars
    assert any(tag.startswith("metrics/iou/") and tag != "metrics/iou/mean" for tag in scalars)
    assert [e.step for e in log.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in log.Scalars(EPOCH_TAG)] == [1, 2]
    assert {f"images/{name}" for name in CLASSES} <= set(log.Tags()["images"])
    assert "config/text_summary" in log.Tags()["tensors"]
    folder = tmp_path / "checkpoints"
    for epoch in (1, 2):
        weights = torch.load(folder / f"2d_unet_{epoch}.pth", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in weights.values())
        state = torch.load(folder / f"csc-extras/2d_unet_{epoch}.state.pth", weights_only=True)
        assert state["epoch"] == epoch and state["global_step"] == 3 * epoch
    assert (folder / "csc-extras/2d_unet_best.pth").is_file()
    assert sorted(p.name for p in folder.glob("2d_unet_*.pth")) == [
        "2d_unet_1.pth",
        "2d_unet_2.pth",
    ]
    assert not list(folder.glob("*.tmp*"))


def test_resumed_runs_equal_one_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    """2 epochs, then 2 more from the checkpoint, give the losses and weights of 4 epochs."""
    whole = train(config_of(data, tmp_path / "whole", epochs=4))
    first = train(config_of(data, tmp_path / "parts", epochs=2))
    second = train(config_of(data, tmp_path / "parts", epochs=2))
    assert (second.first_epoch, second.last_epoch) == (3, 4)
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(whole.losses)
    )
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, msg=name)
    log = events(tmp_path / "parts/tensorboard/2d_unet")
    assert [e.step for e in log.Scalars("loss")] == list(range(1, 13))


def test_a_new_model_to_load_fine_tunes_from_epoch_1(data: Path, tmp_path: Path) -> None:
    train(config_of(data, tmp_path, epochs=1))
    model = UNet(2, 1, len(CLASSES), num_levels=2, base_channels=4)
    tuned = train(config_of(data, tmp_path, epochs=1, model=model, model_name="tuned"))
    assert (tuned.first_epoch, tuned.last_epoch) == (1, 1)
    assert (tmp_path / "checkpoints/tuned_1.pth").is_file()


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_whole_checkpoint(data: Path, tmp_path: Path) -> None:
    """SIGKILL during epoch 2: every checkpoint file left loads, and the rerun starts at 2."""
    config = settings(data, tmp_path, epochs=3, iterations_per_epoch=40)
    script = (
        f"from csc.training import train\nfrom csc.config import build_config\n"
        f"train(build_config({config!r}))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = tmp_path / "checkpoints/2d_unet_1.pth"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists()
    assert not (tmp_path / "checkpoints/2d_unet_2.pth").exists()
    for path in (tmp_path / "checkpoints").glob("*.pth"):
        torch.load(path, weights_only=True)  # none half-written
    resumed = train(config_of(data, tmp_path, epochs=1, iterations_per_epoch=40))
    assert (resumed.first_epoch, resumed.last_epoch) == (2, 2)


def test_csc_train_prints_iou_and_the_tensorboard_command(data: Path, tmp_path: Path) -> None:
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path, epochs=1).items()]
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    outcome = CliRunner().invoke(cli, ["train", str(path)])
    assert outcome.exit_code == 0, outcome.output
    assert "IoU:" in outcome.output and f"--logdir {tmp_path}/tensorboard/2d_unet" in outcome.output


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "adamw", "scheduler": "cosine"},
        {"optimizer": "sgd", "scheduler": "onecycle", "max_grad_norm": 0.5},
        {"optimizer": torch.optim.Adam, "scheduler": "step", "scheduler_kwargs": {"step_size": 1}},
        {"scheduler": "plateau", "gradient_accumulation_steps": 2},
        {"precision": "bf16-mixed", "criterion": "dice_bce", "weight_loss": False},
        {"criterion": torch.nn.BCEWithLogitsLoss, "validation_time_limit": 0.001},
    ],
    ids=[
        "adamw-cosine",
        "sgd-onecycle-clip",
        "adam-class-step",
        "plateau-accumulate",
        "bf16-dice_bce",
        "torch-loss-time-limit",
    ],
)
def test_loop_options_train_and_change_the_learning_rate(
    data: Path, tmp_path: Path, options: dict[str, Any]
) -> None:
    result = train(config_of(data, tmp_path, **options))
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    log = events(tmp_path / "tensorboard/2d_unet")
    rates = [e.value for e in log.Scalars("lr")]
    if options.get("scheduler") in ("cosine", "onecycle", "step"):
        assert rates[0] != rates[1] or rates[0] != 1e-3
    if "validation_time_limit" in options:  # at least one batch, then time is up
        assert len(result.validation) == 2


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 32, 32), (8, 16, 16)], ids=["2D", "3D"])
def test_channels_last_and_compile_train_and_save_plain_weights(
    data: Path, tmp_path: Path, shape: tuple[int, ...]
) -> None:
    """The GPU options on the CPU: channels_last inputs and model, torch.compile (aot_eager:
    the graph capture and autograd of a real compile, without generating C++). The saved
    weights load into a plain model that computes the same outputs."""
    info = {"shape": shape, "scale": (8, 8, 8)}
    ndim = 2 if shape[0] == 1 else 3
    options = {
        "channels_last": True,
        "compile": {"backend": "aot_eager"},
        "epochs": 1,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": f"{ndim}d_unet",
        "model_to_load": f"{ndim}d_unet",
    }
    result = train(config_of(data, tmp_path, **options))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    layout = torch.channels_last if ndim == 2 else torch.channels_last_3d
    weight = next(p for p in result.model.parameters() if p.ndim == ndim + 2)
    assert weight.is_contiguous(memory_format=layout)
    plain = UNet(ndim, 1, len(CLASSES), num_levels=2, base_channels=4)
    weights = torch.load(tmp_path / f"checkpoints/{ndim}d_unet_1.pth", weights_only=True)
    plain.load_state_dict(weights)
    batch = torch.rand(2, 1, *(shape[1:] if ndim == 2 else shape))
    plain.eval(), result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(batch), result.model(batch.contiguous(memory_format=layout))
        )


def slow_normalize(raw: torch.Tensor) -> torch.Tensor:
    """A raw value transform that makes the loader, not the model, the bottleneck (also on a
    loaded machine, where the model's step slows down too)."""
    time.sleep(0.25)
    return raw.float() / 255


def test_a_data_bound_run_is_reported_with_the_settings_to_change(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(config_of(data, tmp_path, epochs=2, train_raw_value_transforms=slow_normalize))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("samples/s" in line for line in lines)
    waiting = [int(line.rsplit("% waiting", 1)[0].rsplit(" ", 1)[1]) for line in lines]
    assert min(waiting) > 30, lines
    assert captured.err.count("data-bound") == 1  # warned once per run
    assert "num_workers (now 0" in captured.err and "chunk_cache_mb (now 256)" in captured.err
    log = events(tmp_path / "tensorboard/2d_unet")
    assert [e.value > 0.3 for e in log.Scalars("perf/data_wait_fraction")] == [True, True]


def test_batches_read_ahead_in_a_thread_that_ends_with_each_epoch(
    data: Path, tmp_path: Path
) -> None:
    """Without loader workers the next batch is read in a thread beside the step (its
    prefetch); the thread of an epoch is gone when the epoch ends, also after an error."""
    config = config_of(data, tmp_path, epochs=2)
    assert dict(config.dataloader_kwargs).get("num_workers", 0) == 0
    train(config)
    assert not [t for t in threading.enumerate() if t.name == "csc-prefetch"]
    failing = config_of(data, tmp_path / "failing", epochs=1, criterion=FailingLoss)
    with pytest.raises(RuntimeError, match="a loss that fails"):
        train(failing)
    assert not [t for t in threading.enumerate() if t.name == "csc-prefetch"]


class FailingLoss(torch.nn.Module):
    def __init__(self, **_kwargs: Any) -> None:  # csc passes reduction="none"
        super().__init__()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a loss that fails")


def test_ema_weights_are_validated_and_saved(data: Path, tmp_path: Path) -> None:
    train(config_of(data, tmp_path, ema_decay=0.9, epochs=1))
    weights = torch.load(tmp_path / "checkpoints/2d_unet_1.pth", weights_only=True)
    state = torch.load(tmp_path / "checkpoints/csc-extras/2d_unet_1.state.pth", weights_only=True)
    name = next(k for k in weights if k.endswith("weight"))
    assert not torch.equal(weights[name], state["model"][name])  # the average, not the last
    assert state["ema"] is not None


def test_early_stopping_and_pruning(data: Path, tmp_path: Path) -> None:
    """Fixed weights (learning rate 0, no batch norm) never improve: patience 1 stops after
    epoch 2, and keep_last_checkpoints=1 leaves the last epoch, the best one and `best`, a
    link to the best epoch's model file."""
    model = UNet(2, 1, len(CLASSES), num_levels=2, base_channels=4, norm=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train(
        config_of(
            data,
            tmp_path,
            model=model,
            optimizer=optimizer,
            epochs=5,
            early_stopping_patience=1,
            keep_last_checkpoints=1,
        )
    )
    assert result.last_epoch == 2 and result.best_epoch == 1
    folder = tmp_path / "checkpoints"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pth"))
    kept = ["2d_unet_1.pth", "2d_unet_2.pth", "csc-extras/2d_unet_1.state.pth"]
    assert names == [*kept, "csc-extras/2d_unet_2.state.pth", "csc-extras/2d_unet_best.pth"]
    assert (folder / "csc-extras/2d_unet_best.pth").samefile(folder / "2d_unet_1.pth")


def test_without_validation_crops_it_says_so_and_trains(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train(config_of(data, tmp_path, validation_prob=0.0, force_all_classes=None))
    assert result.validation == [] and result.last_epoch == 2
    assert capsys.readouterr().out.count("no validation crops") == 1


def test_user_code_loads_the_latest_and_best_weights(data: Path, tmp_path: Path) -> None:
    """`csc.models.load_latest` / `load_best_val` (the toolkit's names) on a csc run."""
    from csc.models import load_best_val, load_latest

    result = train(config_of(data, tmp_path))
    model = UNet(2, 1, len(CLASSES), num_levels=2, base_channels=4)
    template = f"{tmp_path}/checkpoints/2d_unet_{{epoch}}.pth"
    assert load_latest(template, model) == 2
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    best = load_best_val(f"{tmp_path}/tensorboard/2d_unet", template, model)
    assert best == result.best_epoch


def test_a_checkpoint_rebuilds_its_model_alone(data: Path, tmp_path: Path) -> None:
    """`load_model(path)`: no config needed, for an epoch, `best` and a training state."""
    from csc.checkpoints import load_model

    result = train(config_of(data, tmp_path, epochs=1))
    for name in ("2d_unet_1.pth", "csc-extras/2d_unet_best.pth", "csc-extras/2d_unet_1.state.pth"):
        model = load_model(tmp_path / "checkpoints" / name)
        assert isinstance(model, UNet) and model.ndim == 2 and model.num_levels == 2
        for key, value in result.model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)


@pytest.mark.slow
def test_a_config_file_run_as_a_script_trains(data: Path, tmp_path: Path) -> None:
    """`python config.py` with the examples' closing lines: `from csc import train`."""
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path, epochs=1).items()]
    lines += ['if __name__ == "__main__":', "    from csc import train", "", "    train(__file__)"]
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "epoch 1: training loss" in done.stdout
    assert (tmp_path / "checkpoints/2d_unet_1.pth").is_file()


@pytest.mark.parametrize("name", ["train_2D.py", "train_3D.py"])
def test_example_configs_build_their_models(name: str) -> None:
    """The examples resolve, and their models take their patch shapes (checked before data)."""
    from csc.config import load_config
    from csc.data.datasets import PatchSpec
    from csc.runtime import make_model

    config = load_config(Path(__file__).parents[1] / "examples" / name)
    spec = PatchSpec.from_arrays(config.input_array_info, config.target_array_info)
    model = make_model(config, spec)
    shape = [n for axis, n in enumerate(spec.input.shape) if axis != spec.plane_axis]
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 1, *shape))
    assert out.shape == (1, len(config.classes), *shape)


@pytest.mark.slow
def test_spatial_transforms_on_the_device_train_like_the_cpu_path(
    data: Path, tmp_path: Path
) -> None:
    """A run whose loader ships boxes (resampled in the training process) trains on the same
    patches as the CPU path: the same losses within float tolerance."""
    cpu = train(config_of(data, tmp_path / "cpu", epochs=1))
    device = train(
        config_of(data, tmp_path / "device", epochs=1, spatial_transforms_on_device=True)
    )
    assert device.losses and len(device.losses) == len(cpu.losses)
    torch.testing.assert_close(
        torch.tensor(device.losses), torch.tensor(cpu.losses), rtol=1e-4, atol=1e-5
    )


def test_mutual_exclusion_on_the_device_gives_the_cpu_targets(data: Path, tmp_path: Path) -> None:
    """`use_mutual_exclusion` applied after resampling on the device: the CPU path's targets
    (an unannotated class 0 where a class that excludes it is present, NaN elsewhere)."""
    import dataclasses

    from csc.data import build_loaders
    from csc.datasplit import CrawlOptions, SplitOptions, make_datasplit, write_datasplit

    config = config_of(
        data, tmp_path, use_mutual_exclusion=True, iterations_per_epoch=4, weighted_sampler=False
    )
    crawl = CrawlOptions(search_path=f"{data}/{SEARCH}", classes=CLASSES)
    rows, _ = make_datasplit(crawl, SplitOptions(validate_ratio=0.001, force_all_classes=None))
    # mito annotated in none of the crops: 0 where nuc or er (which exclude it) is present.
    rows = [
        dataclasses.replace(r, classes=tuple(c for c in r.classes if c != "mito")) for r in rows
    ]
    write_datasplit(rows, config.datasplit_path, overwrite=True)
    cpu = list(build_loaders(config).train)
    device = list(
        build_loaders(dataclasses.replace(config, spatial_transforms_on_device=True)).train
    )
    plain = list(build_loaders(dataclasses.replace(config, use_mutual_exclusion=False)).train)
    inferred = sum(
        int((b["output"] == 0).sum() - (p["output"] == 0).sum())
        for b, p in zip(cpu, plain, strict=True)
    )
    assert inferred > 0  # the exclusion set some unannotated voxels to 0
    for got, expected in zip(device, cpu, strict=True):
        torch.testing.assert_close(got["input"], expected["input"], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["output"], expected["output"], equal_nan=True)
