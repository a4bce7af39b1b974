"""Time and peak memory of the challenge's instance scoring on one large crop.

Run from the repository root: .venv/bin/python benchmarks/challenge_scoring.py [--size 400]

Builds a `size`³ uint32 truth crop (8 nm voxels) holding `--objects` (500) random boxes, and a
prediction from it: every object shifted by up to 2 voxels, one in five eroded by a voxel, one in
ten dropped, plus 50 small false positives. It then scores the pair with
`csc.scoring.score_label` (instance) and prints the seconds, tp/fp/fn, the crop's size and the
process's peak RSS (VmHWM). Target (issue 18): a few seconds on 2 cores for 400³ and 500
objects, memory about the crop's size times a small factor.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from csc.scoring import score_label


def rss_mb() -> float:
    """This process's peak RSS in MiB (VmHWM, else ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def crops(size: int, num_objects: int, seed: int) -> tuple[NDArray[np.uint32], NDArray[np.uint32]]:
    """A truth crop of boxes (ids 1..n, later ones drawn over earlier ones) and its perturbed
    prediction, both (z, y, x) uint32."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size,) * 3, np.uint32)
    pred = np.zeros_like(truth)
    for obj in range(1, num_objects + 1):
        side = rng.integers(8, 24, 3)
        corner = rng.integers(2, size - side - 2, 3)
        box = tuple(slice(int(c), int(c + s)) for c, s in zip(corner, side, strict=True))
        truth[box] = obj
        if rng.random() < 0.1:
            continue  # a missed object: a false negative
        shift = rng.integers(-2, 3, 3)
        moved = tuple(
            slice(b.start + int(d), b.stop + int(d)) for b, d in zip(box, shift, strict=True)
        )
        pred[moved] = obj
        if rng.random() < 0.2:
            region = pred[moved] == obj
            pred[moved][region & ~ndimage.binary_erosion(region)] = 0
    for _ in range(50):  # false positives: 3³ specks
        corner = rng.integers(0, size - 3, 3)
        pred[tuple(slice(int(c), int(c) + 3) for c in corner)] = num_objects + 1
    return truth, pred


def reset_peak() -> None:
    """Start VmHWM afresh (Linux), so the peak is the scoring's, not the crops' building."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=400, help="crop side in voxels")
    parser.add_argument("--objects", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth, pred = crops(args.size, args.objects, args.seed)
    reset_peak()
    before = rss_mb()
    start = time.perf_counter()
    result = score_label(truth, pred, (8.0, 8.0, 8.0), instance=True)
    seconds = time.perf_counter() - start
    crop_mb = truth.nbytes / 2**20
    print(
        f"{args.size}^3 uint32 crop ({crop_mb:.0f} MiB), {args.objects} objects: scored in "
        f"{seconds:.2f} s; tp/fp/fn {result.tp}/{result.fp}/{result.fn}, status "
        f"{result.status}; peak RSS {rss_mb():.0f} MiB (truth + prediction alone "
        f"{2 * crop_mb:.0f} MiB, {before:.0f} MiB before scoring)"
    )


if __name__ == "__main__":
    main()
