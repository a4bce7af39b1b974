"""The speed cost of `deterministic` and of `train_metrics` (CPU unless a GPU is present).

Run from the repository root:
    .venv/bin/python benchmarks/trainlog.py [--config examples/train_3D.py] [--repeats 5]
        [--batches 10] [KEY=VALUE ...]

Three cases of the same training step (the config's model, loss and optimizer, by default
examples/train_2D.py's 2D UNet, on a fixed random batch: no loader in the way): `plain`
(train_metrics False, deterministic False), `train_metrics` (True) and `deterministic` (True,
train_metrics False). Each repeat times `--batches` steps of every case in turn (the cases
alternate, so the machine's drift hits all alike), after a warm-up; printed: each case's median
seconds per step, and per case the median over the repeats of its time over `plain`'s in the
same repeat. KEY=VALUE overrides the config
(e.g. batch_size=2 precision=bf16-mixed).
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
from csc.datasplit import ensure_datasplit
from csc.reproducibility import deterministic_mode
from csc.synth import SynthSpec, write_synthetic
from csc.training import Run, seed_everything, setup, train_step

EXAMPLE = Path(__file__).parents[1] / "examples/train_2D.py"
CASES: dict[str, dict[str, Any]] = {
    "plain": {"train_metrics": False, "deterministic": False},
    "train_metrics": {"train_metrics": True, "deterministic": False},
    "deterministic": {"train_metrics": False, "deterministic": True},
}


def overrides_for(folder: Path, name: str, extra: list[str], settings: dict[str, Any]) -> list[str]:
    values = {
        "search_path": f"{folder}/data/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}",
        "datasplit_path": f"{folder}/datasplit.csv",
        "load_model": None,
        "model_save_path": f"{folder}/{name}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{folder}/{name}/tensorboard/{{model_name}}",
        **settings,
    }
    return [f"{key}={value!r}" for key, value in values.items()] + extra


def make_run(config_path: Path, folder: Path, name: str, extra: list[str]) -> Run:
    config = load_config(config_path, overrides_for(folder, name, extra, CASES[name]))
    seed_everything(config.random_seed)
    ensure_datasplit(config)
    with deterministic_mode(config.deterministic):
        return setup(config)


def random_batch(run: Run) -> dict[str, torch.Tensor]:
    """A fixed batch of the run's patch shape: the step alone is timed."""
    config = run.config
    shape = run.spec.in_plane(run.spec.input.shape)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(config.batch_size, 1, *shape, generator=generator)
    classes = (config.batch_size, len(config.classes), *shape)
    target = (torch.rand(classes, generator=generator) > 0.5).float()
    return {"input": inputs, "output": target}


def seconds_per_step(run: Run, batch: dict[str, torch.Tensor], batches: int) -> float:
    """Mean seconds of `batches` steps (each reads its loss back: the device is done)."""
    with deterministic_mode(run.config.deterministic):
        start = time.perf_counter()
        for _ in range(batches):
            train_step(run, batch, step_now=True)
        return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=EXAMPLE, help="default: %(default)s")
    parser.add_argument("--data", type=Path, help="folder for data and runs (default: temporary)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="timed steps per case and repeat")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for the config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        if not (folder / "data/jrc_synth1").is_dir():
            write_synthetic(folder / "data", SynthSpec())
        runs = {name: make_run(args.config, folder, name, args.overrides) for name in CASES}
        batch = random_batch(runs["plain"])
        for run in runs.values():
            seconds_per_step(run, batch, 2)  # warm-up: allocations, cuDNN's choices
        times: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(seconds_per_step(run, batch, args.batches))
        for run in runs.values():
            run.tracker.close()
    config = runs["plain"].config
    print(
        f"{config.model_name}, batch {config.batch_size} x {config.input_array_info.shape}, "
        f"{config.precision}, on {runs['plain'].device}; {args.repeats} repeats x "
        f"{args.batches} steps per case"
    )
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times["plain"], strict=True)]
        print(
            f"  {name:<14} {statistics.median(values) * 1000:8.1f} ms/step; x "
            f"{statistics.median(ratios):.3f} of plain (repeats: "
            f"{', '.join(f'{r:.3f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
