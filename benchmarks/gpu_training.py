"""GPU training throughput: does the GPU ever wait for data?

Run from the repository root on a machine with a GPU:
    .venv/bin/python benchmarks/gpu_training.py [--data DIR] [--cases 2d,3d]
(`--quick` runs small shapes on whatever device there is, to check the script itself.)

Per case, on `csc synth` data, with csc's loader defaults for the machine (workers, prefetch,
pinned memory), bf16 autocast and channels_last (csc's default on CUDA with bf16):
  2D: 2d_unet, batch 32, (1, 256, 256) patches at 8 nm, mirror + transpose + rotate;
  3D: 3d_unet, batch 2, (128, 128, 128) patches at 8 nm, the same transforms.
It prints samples/s of the training loop (real loader, loss, optimizer; median of timed epochs
after a warm-up epoch), samples/s of the same model step on batches already resident on the
GPU, their ratio (target <= 1.1: the GPU never waits for data), the loop's share of time
waiting for data, and the loop against the pure model step (forward, loss, backward,
optimizer step on the resident batch, no checks, metrics or host syncs: benchmarks/training.py's
baseline), which shows what the loop's own work (metric counts, non-finite checks, the one
host sync per step) costs on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from training import pure_steps  # benchmarks/training.py, beside this script

from csc.config import build_config
from csc.synth import SynthSpec, write_synthetic
from csc.training import seed_everything, setup, train_epoch, train_step

TARGET_RATIO = 1.1
CLASSES = ("nuc", "mito", "er")
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
# Raw 1024 x 2048 x 2048 nm; crops 512 x 1536 x 1536 nm (labels at 4 nm), 3 per dataset.
DATA = SynthSpec(
    num_datasets=2,
    num_crops=3,
    shape=(128, 256, 256),
    crop_shape=(128, 384, 384),
    chunks=(64, 128, 128),
)
TRANSFORMS = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5}},
    "transpose": {"axes": ["x", "y"]},
    "rotate": {"axes": {"z": [-180, 180]}},
}


@dataclasses.dataclass(frozen=True)
class Case:
    model_name: str
    shape: tuple[int, int, int]
    batch_size: int


CASES = {"2d": Case("2d_unet", (1, 256, 256), 32), "3d": Case("3d_unet", (128, 128, 128), 2)}
QUICK = {"2d": Case("2d_unet", (1, 64, 64), 4), "3d": Case("3d_unet", (32, 32, 32), 1)}


def make_config(folder: Path, case: Case, *, iterations: int, device: str) -> Any:
    info = {"shape": case.shape, "scale": (8, 8, 8)}
    return build_config(
        {
            "search_path": f"{folder}/data/{SEARCH}",
            "datasplit_path": f"{folder}/datasplit.csv",
            "classes": CLASSES,
            "input_array_info": info,
            "target_array_info": info,
            "model_name": case.model_name,
            "model_to_load": case.model_name,
            "batch_size": case.batch_size,
            "iterations_per_epoch": iterations,
            "spatial_transforms": TRANSFORMS,
            "precision": "bf16-mixed",
            "device": device,
            "load_model": None,
            "learning_rate": 1e-4,
            "model_save_path": f"{folder}/checkpoints/{{model_name}}_{{epoch}}.pth",
            "logs_save_path": f"{folder}/tensorboard/{{model_name}}",
        }
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(folder: Path, case: Case, *, iterations: int, repeats: int, device: str) -> None:
    config = make_config(folder, case, iterations=iterations, device=device)
    seed_everything(config.random_seed)
    run = setup(config)
    channels = len(CLASSES)
    plane = case.shape[1:] if case.shape[0] == 1 else case.shape  # a 2D patch: (H, W)
    inputs = torch.rand(case.batch_size, 1, *plane, device=run.device)
    if run.memory_format is not None:
        inputs = inputs.contiguous(memory_format=run.memory_format)
    target = (torch.rand(case.batch_size, channels, *plane, device=run.device) > 0.5).float()
    resident = {"input": inputs, "output": target}
    train_epoch(run, 1)  # warm-up: workers start, cudnn picks its kernels, caches fill
    loop, pure, waiting, bare = [], [], [], []
    for repeat in range(repeats):
        synchronize(run.device)
        start = time.perf_counter()
        train_epoch(run, 2 + repeat)
        synchronize(run.device)
        loop.append(iterations * case.batch_size / (time.perf_counter() - start))
        assert run.throughput is not None
        waiting.append(run.throughput.data_wait_fraction)
        start = time.perf_counter()
        for _ in range(iterations):
            train_step(run, resident, step_now=True)
        synchronize(run.device)
        pure.append(iterations * case.batch_size / (time.perf_counter() - start))
        bare.append(case.batch_size / pure_steps(run, inputs, target, iterations))
    run.tracker.close()
    workers = run.loaders.train.num_workers
    del run
    loop_rate, pure_rate = statistics.median(loop), statistics.median(pure)
    bare_ratio = statistics.median(b / a for a, b in zip(loop, bare, strict=True))
    print(
        f"{case.model_name} batch {case.batch_size} {case.shape}: training "
        f"{loop_rate:.1f} samples/s, resident model step {pure_rate:.1f} samples/s, ratio "
        f"{pure_rate / loop_rate:.3f} (target <= {TARGET_RATIO}); waiting for data "
        f"{statistics.median(waiting):.0%}; {workers} loader workers; pure model step "
        f"{statistics.median(bare):.1f} samples/s, loop / pure step {bare_ratio:.3f} "
        f"(medians of {repeats} x {iterations} batches)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder for data and runs (default: temporary)")
    parser.add_argument("--cases", default="2d,3d", help="comma list of: 2d, 3d")
    parser.add_argument("--iterations", type=int, default=50, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per case")
    parser.add_argument("--quick", action="store_true", help="small shapes, any device")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("no GPU here: this benchmark measures a GPU (use --quick to test the script)")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        if not (folder / "data/jrc_synth1").is_dir():
            start = time.perf_counter()
            write_synthetic(folder / "data", DATA)
            print(f"wrote {DATA} in {time.perf_counter() - start:.0f} s")
        for key in args.cases.split(","):
            case = (QUICK if args.quick else CASES)[key.strip()]
            measure(folder, case, iterations=args.iterations, repeats=args.repeats, device=device)


if __name__ == "__main__":
    main()
