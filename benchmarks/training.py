"""Training benchmarks on `csc synth` data (CPU unless a GPU is present).

Run from the repository root: .venv/bin/python benchmarks/training.py [--data DIR] [--skip-iou]

(a) step time: the training loop's seconds per batch (real loader, loss, optimizer; 2D UNet,
    batch 8, (1, 128, 128) patches) against the pure model step (same model, loss and optimizer
    on random tensors, same process, each repeat right after the loop's); target ratio <= 1.05.
(b) IoU: the README demo's config (examples/train_2D.py) trained for a few minutes; prints the
    wall time and the per-class and mean validation IoU; target mean IoU >= 0.7.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from csc.config import load_config
from csc.synth import SynthSpec, write_synthetic
from csc.training import seed_everything, setup, train, train_epoch, train_step

EXAMPLE = Path(__file__).parents[1] / "examples/train_2D.py"
STEP_BATCHES = 10  # timed batches per measurement, after a warm-up epoch


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


def step_times(folder: Path, repeats: int) -> None:
    config = load_config(EXAMPLE, overrides_for(folder, iterations_per_epoch=STEP_BATCHES))
    seed_everything(config.random_seed)
    from csc.datasplit import ensure_datasplit

    ensure_datasplit(config)
    run = setup(config)
    train_epoch(run, 1)  # warm-up
    loop, pure = [], []
    inputs = torch.rand(config.batch_size, 1, 128, 128)
    target = (torch.rand(config.batch_size, len(config.classes), 128, 128) > 0.5).float()
    for repeat in range(repeats):
        start = time.perf_counter()
        train_epoch(run, 2 + repeat)
        loop.append((time.perf_counter() - start) / STEP_BATCHES)
        start = time.perf_counter()
        for _ in range(STEP_BATCHES):
            train_step(run, {"input": inputs, "output": target}, step_now=True)
        pure.append((time.perf_counter() - start) / STEP_BATCHES)
    run.tracker.close()
    loop_s, pure_s = statistics.median(loop), statistics.median(pure)
    # Each repeat's loop and step ran back to back: their ratio cancels the machine's drift
    # from one repeat to the next (up to 40 % here), which a ratio of medians does not.
    ratios = [a / b for a, b in zip(loop, pure, strict=True)]
    print(
        f"(a) training loop: {loop_s:.3f} s/batch; pure model step: {pure_s:.3f} s/batch "
        f"(medians of {repeats} x {STEP_BATCHES} batches); ratio {statistics.median(ratios):.3f} "
        f"(median of the repeats' ratios: {', '.join(f'{r:.3f}' for r in ratios)}; "
        "target <= 1.05)"
    )


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
    parser.add_argument("--skip-iou", action="store_true")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the IoU run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        if not (folder / "data/jrc_synth1").is_dir():
            write_synthetic(folder / "data", SynthSpec())
        if not args.skip_steps:
            step_times(folder, args.repeats)
        if not args.skip_iou:
            demo_iou(folder, args.overrides)


if __name__ == "__main__":
    main()
