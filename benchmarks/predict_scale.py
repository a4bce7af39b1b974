"""Prediction throughput on 1, 2, ... processes (torchrun), and peak memory per rank.

Run from the repository root:

    .venv/bin/python benchmarks/predict_scale.py [--data DIR] [--nproc 1,2] [--repeats 2]
    .venv/bin/python benchmarks/predict_scale.py --device cuda --nproc 1,2,4,8 --blocks 4,4,4

Writes `csc synth` data whose raw is `--blocks` (z, y, x) blocks of `prediction_block_shape`
(32, 128, 128) voxels of 8 nm (default 2 x 2 x 2: 8 blocks, 4.2 M voxels), a small 3D UNet
with random weights ((32, 64, 64) windows, overlap 0.25, batches of 4, 3 classes as uint8),
then for each case runs `torchrun --nproc-per-node=N -m csc predict CONFIG --dataset
jrc_synth1` (the whole raw) in fresh processes, cases alternating, `--repeats` times. Each
rank prints its blocks, the time until every rank's blocks were written and its peak RSS
(VmHWM); this prints voxels/s over that time (the pyramid after it is not counted; the
command's wall time, start-up and pyramid included, is shown too), the peak RSS of each rank,
and each case's ratio to the first case's voxels/s.

Cases: `--nproc` process counts, each with `--threads` torch threads per process (default:
the cores divided by the processes); on CPU also one process with the largest case's threads
per process, and one with as many threads as the largest case uses in all (so 2 processes x
1 thread is compared with 1 x 1 and 1 x 2). Ratios are to the first case (fewest processes
and threads).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from csc.launch import torchrun_command

BLOCK = (32, 128, 128)  # output voxels of 8 nm
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
RANK_LINE = re.compile(
    r"rank (\d+) of (\d+): .*?: (\d+) blocks in ([\d.]+) s, all ranks' blocks in ([\d.]+) s, "
    r"peak RSS (\d+) MiB"
)


def settings(folder: Path, device: str) -> dict[str, Any]:
    info = {"shape": (32, 64, 64), "scale": (8, 8, 8)}
    return {
        "search_path": f"{folder}/data/{SEARCH}",
        "datasplit_path": f"{folder}/datasplit.csv",
        "classes": ("nuc", "mito", "er"),
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "3d_unet",
        "model_kwargs": {"num_levels": 2, "base_channels": 8},
        "batch_size": 4,
        "device": device,
        "prediction_block_shape": BLOCK,
        "model_save_path": f"{folder}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{folder}/tensorboard/{{model_name}}",
    }


def prepare(folder: Path, blocks: tuple[int, int, int], device: str) -> Path:
    """The data, config file and weights (made once per folder); the config's path."""
    import torch

    from csc.config import load_config
    from csc.data.datasets import PatchSpec
    from csc.datasplit import ensure_datasplit
    from csc.runtime import make_model
    from csc.synth import SynthSpec, write_synthetic

    shape = tuple(b * n for b, n in zip(BLOCK, blocks, strict=True))
    if not (folder / "data/jrc_synth1").is_dir():
        spec = SynthSpec(
            num_datasets=1,
            num_crops=1,
            shape=(shape[0], shape[1], shape[2]),
            crop_shape=(32, 64, 64),
            chunks=(64, 64, 64),
            missing_class_prob=0.0,
        )
        write_synthetic(folder / "data", spec)
    path = folder / "config.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in settings(folder, device).items()))
    config = load_config(path)
    ensure_datasplit(config, echo=lambda _: None)
    weights = Path(config.model_save_path.format(model_name=config.model_name, epoch=1))
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(make_model(config, PatchSpec.from_config(config)).state_dict(), weights)
    return path


def run_case(config: Path, output: Path, nproc: int, threads: int) -> dict[str, Any]:
    """One `torchrun -m csc predict` of the whole raw into a fresh `output`."""
    arguments = ["predict", str(config), "--dataset", "jrc_synth1", "--output", str(output)]
    command = torchrun_command(nproc, arguments)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    ranks = [m.groups() for m in RANK_LINE.finditer(done.stderr)]
    if len(ranks) != nproc:
        raise SystemExit(f"expected {nproc} rank lines in:\n{done.stderr[-4000:]}")
    return {
        "seconds": max(float(r[4]) for r in ranks),
        "wall": wall,
        "rss": [int(r[5]) for r in sorted(ranks, key=lambda r: int(r[0]))],
        "blocks": [int(r[2]) for r in sorted(ranks, key=lambda r: int(r[0]))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder for data (default: temporary)")
    parser.add_argument("--device", default="cpu", help="the config's device: cpu, cuda")
    parser.add_argument("--nproc", default="1,2", help="comma list of process counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--blocks", default="2,2,2", help="raw size in blocks, z,y,x")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    blocks = tuple(int(v) for v in args.blocks.split(","))
    if len(blocks) != 3 or math.prod(blocks) < 8:
        raise SystemExit("--blocks: three counts z,y,x, at least 8 blocks in all")
    counts = [int(v) for v in args.nproc.split(",")]
    cores = os.cpu_count() or 1
    cases = [(n, args.threads or max(1, cores // n)) for n in counts]
    if args.device == "cpu":  # one process with one thread per process of the largest case,
        # and one with as many threads as the largest case uses in all
        widest = max(cases, key=lambda case: (case[0] * case[1], case[0]))
        extra = [(1, widest[1]), (1, widest[0] * widest[1])]
        cases = [*dict.fromkeys([*extra, *cases])]
    cases.sort()
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        config = prepare(folder, (blocks[0], blocks[1], blocks[2]), args.device)
        voxels = math.prod(b * n for b, n in zip(BLOCK, blocks, strict=True))
        print(
            f"raw {tuple(b * n for b, n in zip(BLOCK, blocks, strict=True))} voxels "
            f"({voxels / 1e6:.1f} M) = {math.prod(blocks)} blocks of {BLOCK}; device "
            f"{args.device}; {cores} cores",
            flush=True,
        )
        results: dict[tuple[int, int], list[dict[str, Any]]] = {case: [] for case in cases}
        for repeat in range(args.repeats):
            for case in cases:
                output = Path(tempfile.mkdtemp(dir=folder, prefix="out-"))
                result = run_case(config, output, *case)
                results[case].append(result)
                print(
                    f"  [{repeat}] {case[0]} process(es) x {case[1]} thread(s): "
                    f"{voxels / result['seconds'] / 1e3:.0f} k voxels/s "
                    f"({result['seconds']:.1f} s; command {result['wall']:.1f} s), blocks "
                    f"per rank {result['blocks']}, peak RSS per rank {result['rss']} MiB",
                    flush=True,
                )
        base = statistics.median(voxels / r["seconds"] for r in results[cases[0]])
        print(f"median over repeats (ratios to {cases[0][0]} x {cases[0][1]}):")
        for case, runs in results.items():
            rate = statistics.median(voxels / r["seconds"] for r in runs)
            rss = max(max(r["rss"]) for r in runs)
            print(
                f"  {case[0]} x {case[1]}: {rate / 1e3:.0f} k voxels/s, {rate / base:.2f}x the "
                f"{cases[0][0]} x {cases[0][1]} case; peak RSS per rank up to {rss} MiB"
            )


if __name__ == "__main__":
    main()
