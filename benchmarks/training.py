"""Training benchmarks on `csc synth` data (CPU unless a GPU is present).

Run from the repository root: .venv/bin/python benchmarks/training.py [--data DIR] [--skip-iou]

(a) step time: the training loop's seconds per batch (`train_epoch`: real loader, loss,
    optimizer, the non-finite checks, training metrics, logging, progress bar) for the README
    demo's config (examples/train_2D.py: 2D UNet, batch 8, (1, 128, 128) patches, epochs of its
    50 batches) against the pure model step: the same model, loss and optimizer on one of the
    loader's batches, resident on the device: forward, loss, backward, optimizer step, nothing
    else. Each repeat times one epoch of each, in alternating order; the ratio is the median of
    the repeats' ratios; target <= 1.05. Then the breakdown: what each part of the loop adds per
    batch, timed alone on the same tensors in the same run (the data wait as the loop measured
    it), in ms and as a share of the pure step. `--toggles` adds loop epochs with train_metrics
    off, alternated with the others.
(b) IoU: the README demo's config (examples/train_2D.py) trained for a few minutes; prints the
    wall time and the per-class and mean validation IoU; target mean IoU >= 0.7.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from csc.config import load_config
from csc.runtime import autocast
from csc.synth import SynthSpec, write_synthetic
from csc.training import (
    Run,
    checked_loss,
    copy_tensors,
    epoch_throughput,
    log_epoch_counts,
    log_train_images,
    sampled_counts,
    seed_everything,
    setup,
    to_device,
    train,
    train_epoch,
    update_bar,
)
from csc.training_log import log_step, log_train_metrics, make_train_metrics

EXAMPLE = Path(__file__).parents[1] / "examples/train_2D.py"
TARGET = 1.05
CALLS = 20  # calls per timing of one part of the breakdown
EPOCH_PART = "epoch start and end (images, counts, metrics), per batch"


def overrides_for(folder: Path, **extra: Any) -> list[str]:
    values = {
        "search_path": f"{folder}/data/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}",
        "datasplit_path": f"{folder}/datasplit.csv",
        "load_model": None,
        "model_save_path": f"{folder}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{folder}/tensorboard/{{model_name}}",
        **extra,
    }
    return [f"{key}={value!r}" for key, value in values.items()]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_step(run: Run, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model step alone, as any trainer must run it per batch: forward, loss, backward,
    optimizer step. No loader, checks, metrics, logging, nor a host sync."""
    with autocast(run.device, run.config.precision):
        logits = run.model(inputs).float()
        loss = run.loss_fn(logits, target)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@contextlib.contextmanager
def restored(run: Run) -> Iterator[None]:
    """The model's and optimizer's state put back afterwards: the pure steps, which check
    nothing, leave the run as they found it (a non-finite step would spoil the weights the loop
    goes on training)."""
    model = copy.deepcopy(run.model.state_dict())
    optimizer = copy.deepcopy(run.optimizer.state_dict())
    try:
        yield
    finally:
        run.model.load_state_dict(model)
        run.optimizer.load_state_dict(optimizer)
        run.optimizer.zero_grad(set_to_none=True)


def pure_steps(run: Run, inputs: torch.Tensor, target: torch.Tensor, count: int) -> float:
    """Seconds per pure step, `count` in a row; the run left as it was (`restored`)."""
    with restored(run):
        synchronize(run.device)
        start = time.perf_counter()
        for _ in range(count):
            pure_step(run, inputs, target)
        synchronize(run.device)
        return (time.perf_counter() - start) / count


def timed(function: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds per call of `function`, `calls` calls in a row."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def loop_parts(run: Run, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """What the loop does per batch beyond the pure step, each part alone, on a real batch."""
    inputs, target = to_device(run, batch)
    logits, loss = with_gradients(run, inputs, target)
    bar = tqdm(total=10**9, file=io.StringIO(), mininterval=0.1)  # drawn, as on a terminal
    metrics, started = make_train_metrics(run.config), time.perf_counter()

    def epoch_ends() -> None:  # once per epoch: timed once, shown per batch
        log_train_images(run, batch)
        run.throughput = epoch_throughput(run, 1.0, 0.0)
        log_epoch_counts(run)
        log_train_metrics(run)

    buffers = list(run.model.buffers())
    parts: dict[str, Callable[[], object]] = {
        "non-finite check (loss, gradient norm)": lambda: checked_loss(run, loss),
        "buffer snapshot for skip_step": lambda: copy_tensors(run.skipped.buffers, buffers),
        "per-batch scalars (log_step)": lambda: log_step(run, {"loss": 0.5}),
        "progress bar": lambda: update_bar(bar, loss=0.5, samples=8, started=started),
        EPOCH_PART: epoch_ends,
    }
    if metrics is not None:  # its counts hold the sampled voxels too (`epoch_sampled`)
        parts = {"train_metrics update": lambda: metrics.update(logits, target), **parts}
    else:
        parts = {"sampled counts": lambda: sampled_counts(target), **parts}
    return parts


def with_gradients(
    run: Run, inputs: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward without a step: the logits and loss, and gradients for the
    non-finite check to measure (dropped before the next case)."""
    with autocast(run.device, run.config.precision):
        logits = run.model(inputs).float()
        loss = run.loss_fn(logits, target)
    loss.backward()
    return logits.detach(), loss.detach()


def step_times(folder: Path, repeats: int, *, toggles: bool) -> None:
    config = load_config(EXAMPLE, overrides_for(folder))
    seed_everything(config.random_seed)
    from csc.datasplit import ensure_datasplit

    ensure_datasplit(config)
    run = setup(config)
    batches = config.iterations_per_epoch
    train_epoch(run, 1)  # warm-up
    batch = next(iter(run.loaders.train))  # one real batch, resident for the pure step
    inputs, target = (t.clone() for t in to_device(run, batch))
    cases: dict[str, Callable[[int], float]] = {
        "loop": lambda epoch: loop_epoch(run, epoch),
        "pure step": lambda _epoch: pure_steps(run, inputs, target, batches),
    }
    if toggles:
        cases["loop, train_metrics off"] = lambda epoch: loop_without_metrics(run, epoch)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    waits: list[float] = []
    parts = loop_parts(run, batch)
    part_s: dict[str, list[float]] = {name: [] for name in parts}
    epoch = 2
    for repeat in range(repeats):
        order = list(cases) if repeat % 2 == 0 else list(reversed(cases))
        for name in order:
            seconds[name].append(cases[name](epoch))
            if name == "loop":
                assert run.throughput is not None
                waits.append(run.throughput.data_wait_fraction * seconds[name][-1])
            epoch += 1
        with_gradients(run, inputs, target)  # for the non-finite check's gradient norm
        for name, part in parts.items():
            once = name == EPOCH_PART  # once per epoch: its share per batch
            seconds_per_call = timed(part, run.device, 1 if once else CALLS)
            part_s[name].append(seconds_per_call / batches if once else seconds_per_call)
        run.optimizer.zero_grad(set_to_none=True)
    run.tracker.close()
    report(seconds, waits, part_s, repeats=repeats, batches=batches)


def loop_epoch(run: Run, epoch: int) -> float:
    """Seconds per batch of one epoch of the training loop."""
    synchronize(run.device)
    start = time.perf_counter()
    train_epoch(run, epoch)
    synchronize(run.device)
    return (time.perf_counter() - start) / run.config.iterations_per_epoch


def loop_without_metrics(run: Run, epoch: int) -> float:
    """Seconds per batch of one epoch of the loop with `train_metrics` off (the toggle)."""
    kept = run.train_metrics
    run.train_metrics = None
    try:
        return loop_epoch(run, epoch)
    finally:
        run.train_metrics = kept


def report(
    seconds: dict[str, list[float]],
    waits: list[float],
    part_s: dict[str, list[float]],
    *,
    repeats: int,
    batches: int,
) -> None:
    loop, pure = seconds["loop"], seconds["pure step"]
    # Each repeat's cases ran back to back: their ratio cancels the machine's drift from one
    # repeat to the next (up to 40 % here), which a ratio of medians does not.
    ratios = [a / b for a, b in zip(loop, pure, strict=True)]
    pure_s = statistics.median(pure)
    print(
        f"(a) training loop: {statistics.median(loop):.4f} s/batch; pure model step: "
        f"{pure_s:.4f} s/batch (medians of {repeats} x {batches} batches); ratio "
        f"{statistics.median(ratios):.3f} (median of the repeats' ratios: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; target <= {TARGET})"
    )
    for name, values in seconds.items():
        if name not in ("loop", "pure step"):
            toggled = [a / b for a, b in zip(values, pure, strict=True)]
            print(f"    {name}: ratio {statistics.median(toggled):.3f}")
    print("    breakdown per batch (medians over the repeats; share of the pure step):")
    rows = {"data wait (as the loop measured it)": waits, **part_s}
    parts = {name: statistics.median(values) for name, values in rows.items()}
    parts["sum of the parts"] = sum(parts.values())
    parts["rest: loop - pure step - parts (noise included)"] = (
        statistics.median(loop) - pure_s - parts["sum of the parts"]
    )
    for name, value in parts.items():
        print(f"      {name:<58} {1000 * value:7.3f} ms  {value / pure_s:6.2%}")


def demo_iou(folder: Path, extra: list[str]) -> None:
    start = time.perf_counter()
    result = train(EXAMPLE, overrides_for(folder) + extra)
    seconds = time.perf_counter() - start
    iou = result.validation[-1]["metrics"]["iou"]
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in iou.items() if v is not None)
    print(
        f"(b) examples/train_2D.py: {result.last_epoch} epochs in {seconds:.0f} s; "
        f"validation IoU {per_class} (target mean >= 0.7)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder for data and runs (default: temporary)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--toggles", action="store_true", help="also: loop with train_metrics off")
    parser.add_argument("--skip-iou", action="store_true")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the IoU run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        if not (folder / "data/jrc_synth1").is_dir():
            write_synthetic(folder / "data", SynthSpec())
        if not args.skip_steps:
            step_times(folder, args.repeats, toggles=args.toggles)
        if not args.skip_iou:
            demo_iou(folder, args.overrides)


if __name__ == "__main__":
    main()
