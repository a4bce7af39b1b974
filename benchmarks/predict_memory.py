"""Peak memory of `csc predict` against the size of the predicted volume.

Run from the repository root: .venv/bin/python benchmarks/predict_memory.py [--data DIR]

Writes `csc synth` data with a 1024 x 4096 x 4096 nm raw, then, each in a fresh process,
predicts a box of 1x, 2x, 4x and 8x the configured block (`prediction_block_shape` 32 x 128 x
128 voxels of 8 nm) with a small 3D UNet (random weights, (32, 64, 64) windows, overlap 0.25)
and prints the wall time and the peak RSS (VmHWM) before and after predicting. Target (issue:
predict and evaluate): peak RSS does not grow with the volume. Run with the default chunk cache
(256 MiB, which a bigger volume fills further) and with 16 MiB.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BLOCK = (32, 128, 128)  # output voxels of 8 nm
MULTIPLES = {1: (1, 1, 1), 2: (1, 1, 2), 4: (1, 2, 2), 8: (2, 2, 2)}  # block counts, (z, y, x)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"


def settings(folder: Path, cache_mb: int) -> dict[str, Any]:
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
        "device": "cpu",
        "prediction_block_shape": BLOCK,
        "chunk_cache_mb": cache_mb,
        "model_save_path": f"{folder}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{folder}/tensorboard/{{model_name}}",
    }


def rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over a fork and
    exec, so a child would report the parent's peak (the data writing's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(folder: Path, multiple: int, cache_mb: int) -> dict[str, float]:
    """In this (fresh) process: predict a box of `multiple` blocks; RSS before and after."""
    import torch

    from csc.config import build_config
    from csc.data.datasets import PatchSpec
    from csc.datasplit import ensure_datasplit
    from csc.prediction import box_region, load_predictor, write_predictions
    from csc.runtime import make_model

    config = build_config(settings(folder, cache_mb))
    ensure_datasplit(config, echo=lambda _: None)
    weights = folder / "weights.pth"
    if not weights.exists():
        spec = PatchSpec.from_config(config)
        torch.manual_seed(0)
        torch.save(make_model(config, spec).state_dict(), weights)
    counts = MULTIPLES[multiple]
    voxels = [b * n for b, n in zip(BLOCK, counts, strict=True)]
    low = -4.0  # the edge of raw voxel 0: output voxels then sit on raw voxel centres
    box = (low, low, low, *(low + 8.0 * n for n in voxels))
    region = box_region(config, "jrc_synth1", box)
    predictor = load_predictor(config, checkpoint=str(weights), progress=False)
    before = rss_mb()
    start = time.perf_counter()
    output = Path(tempfile.mkdtemp(dir=folder))
    write_predictions(config, [region], predictor, output=output)
    seconds = time.perf_counter() - start
    return {
        "before_mb": before,
        "peak_mb": rss_mb(),
        "seconds": seconds,
        "voxels": float(math.prod(voxels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder for data (default: temporary)")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.data, *args.child)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = (args.data or Path(temporary)).resolve()
        if not (folder / "data/jrc_synth1").is_dir():
            from csc.synth import SynthSpec, write_synthetic

            spec = SynthSpec(
                num_datasets=1,
                num_crops=1,
                shape=(128, 512, 512),
                crop_shape=(32, 64, 64),
                chunks=(64, 64, 64),
            )
            write_synthetic(folder / "data", spec)
        for cache_mb in (256, 16):
            print(f"chunk_cache_mb = {cache_mb}")
            for multiple in MULTIPLES:
                command = [
                    sys.executable,
                    __file__,
                    "--data",
                    str(folder),
                    "--child",
                    str(multiple),
                    str(cache_mb),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"  {multiple}x block ({result['voxels'] / 1e6:.1f} M voxels): "
                    f"{result['seconds']:.1f} s; RSS before predicting {result['before_mb']:.0f} "
                    f"MB, peak {result['peak_mb']:.0f} MB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
