"""Training-loader throughput against a plain tensorstore read of the same patches, and memory.

Run from the repository root: .venv/bin/python benchmarks/data_loader.py [--quick] [--data DIR]
Writes `csc synth` data (into a temporary folder, or DIR to keep and reuse it), crawls it into a
datasplit (every crop trains but one), then, each in a fresh process:

(a) samples/s of `build_loaders(config).train`, median of whole epochs after a warm-up epoch: 2D
    (1, 128, 128) patches, batch 8, 2D (1, 256, 256), batch 16 ("2D 256"), and 3D (64, 64, 64),
    batch 2, all at 8 nm with mirror, transpose and rotation about z, and the same 3D patches
    with no spatial transforms ("3D plain"); in one process and with num_workers=2
    (persistent, csc's default, and restarted every epoch);
    data compressed with zstd and with blosc-lz4;
    and "1 process, boxes": spatial_transforms_on_device, the loader's part (boxes shipped,
    labels coded; `csc.data.device` resamples them in the training process on its GPU), with
    the median ms per batch that device step takes on this CPU;
(b) next to each one-process run, the read limit: the same (crop, centre) patches read axis
    aligned by plain tensorstore, one batch of reads issued at once, no transforms; and the
    ratio loader / limit;
(c) peak RSS (ru_maxrss, MB) after imports, after building the loaders, and after drawing 100
    2D batches, with a datasplit of 10 crops and of 1,000 crops; growth per crop.

A fresh process per measurement: a fork of a process that has used tensorstore aborts, and no
run inherits another's chunk cache. This machine's speed moves by up to 40 % from one process
to the next, steady within each: every one-process case runs in --repeats processes, and its
figure is the median of their medians (each process's figures are printed too). Targets (issue:
data loading) are printed next to results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from csc.config import TrainConfig, build_config
from csc.datasplit import (
    CrawlOptions,
    SplitOptions,
    make_datasplit,
    read_datasplit,
    summarise,
    write_datasplit,
)
from csc.synth import SynthSpec, write_dataset

CLASSES = ("nuc", "mito", "er")  # every class `csc synth` draws
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
TARGET_2D_RATE = 1000.0  # samples/s, 2D loader in one process
TARGET_RATIO = 0.5  # loader / read limit
TARGET_MB_PER_CROP = 1.0
# Crops of 384 x 1536 x 1536 nm in a 1024 x 3072 x 3072 nm raw: 72 raw chunks per dataset.
LOADER_SPEC = SynthSpec(
    num_datasets=2,
    num_crops=4,
    shape=(128, 384, 384),
    crop_shape=(96, 384, 384),
    chunks=(64, 64, 64),
)
# Many small crops, two levels (labels at 4 and 8 nm): the 8 nm patches read s1.
RSS_SPEC = SynthSpec(
    num_datasets=10,
    num_crops=100,
    shape=(32, 128, 128),
    crop_shape=(16, 64, 64),
    chunks=(32, 64, 64),
    num_levels=2,
)
DATA_SETS = {
    "zstd": LOADER_SPEC,
    "blosc-lz4": dataclasses.replace(LOADER_SPEC, compressor="blosc-lz4"),
    "rss-10": dataclasses.replace(RSS_SPEC, num_datasets=1, num_crops=10),
    "rss-1000": RSS_SPEC,
}
PATCHES = {
    "2D": {
        "shape": (1, 128, 128),
        "batch_size": 8,
        "spatial_transforms": {
            "mirror": {"axes": {"x": 0.5, "y": 0.5}},
            "transpose": {"axes": ["x", "y"]},
            "rotate": {"axes": {"z": [-180, 180]}},
        },
    },
    "3D": {
        "shape": (64, 64, 64),
        "batch_size": 2,
        "spatial_transforms": {
            "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.5}},
            "transpose": {"axes": ["x", "y"]},
            "rotate": {"axes": {"z": [-180, 180]}},
        },
    },
    # Larger work (issue 21): 2D at 256^2, batch 16, the same transforms.
    "2D 256": {
        "shape": (1, 256, 256),
        "batch_size": 16,
        "spatial_transforms": {
            "mirror": {"axes": {"x": 0.5, "y": 0.5}},
            "transpose": {"axes": ["x", "y"]},
            "rotate": {"axes": {"z": [-180, 180]}},
        },
    },
    # The 3D case names no transforms: patches read as they lie.
    "3D plain": {"shape": (64, 64, 64), "batch_size": 2, "spatial_transforms": {}},
}
ON_DEVICE = "1 process, boxes"  # spatial_transforms_on_device: the loader's part (see below)
WORKERS = {
    "1 process": {},
    ON_DEVICE: {},
    "2 workers": {"num_workers": 2},  # persistent: csc's default with workers
    # For comparison: workers (and their stores and chunk caches) started again every epoch.
    "2 workers, restarted": {"num_workers": 2, "persistent_workers": False},
}


# --- Data, written once per folder ---------------------------------------------------------


def prepare(folder: Path, names: list[str]) -> None:
    """Write each named data set under `folder` unless written there with the same spec, and
    its datasplit (all crops train but one)."""
    for name in names:
        spec, where = DATA_SETS[name], folder / name
        marker = where / "synth.json"
        print(f"{name}: {spec}")
        if marker.is_file() and json.loads(marker.read_text()) == _as_json(spec):
            print("  reused")
            continue
        shutil.rmtree(where, ignore_errors=True)
        start = time.perf_counter()
        write_parallel(where, spec)
        seconds = time.perf_counter() - start
        crawl = CrawlOptions(search_path=f"{where}/{SEARCH}", classes=CLASSES)
        rows, _ = make_datasplit(crawl, SplitOptions(validate_ratio=0.001, force_all_classes=None))
        write_datasplit(rows, where / "datasplit.csv", overwrite=True)
        marker.write_text(json.dumps(_as_json(spec)))
        print(f"  written in {seconds:.1f} s; datasplit: {summarise(rows)}")


def _as_json(spec: SynthSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples as lists, as read back


def write_parallel(folder: Path, spec: SynthSpec) -> None:
    """`write_synthetic`, its datasets written by a pool of processes (zarr's per-array
    overhead, not compression, dominates small crops)."""
    jobs = [(folder, spec, index) for index in range(spec.num_datasets)]
    with ProcessPoolExecutor(min(len(jobs), 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(_write_one, jobs))


def _write_one(job: tuple[Path, SynthSpec, int]) -> None:
    folder, spec, index = job
    name = f"jrc_synth{index + 1}"  # as write_synthetic names them
    write_dataset(folder / name / f"{name}.zarr", name, spec, index, 1 + index * spec.num_crops)


def make_config(
    folder: str, patch: str, *, workers: str, iterations: int, cache_mb: int
) -> TrainConfig:
    """The training config of a measurement: a patch kind, a worker setting, a data set."""
    info = {"shape": PATCHES[patch]["shape"], "scale": (8, 8, 8)}
    return build_config(
        {
            "datasplit_path": f"{folder}/datasplit.csv",
            "classes": CLASSES,
            "input_array_info": info,
            "target_array_info": info,
            "batch_size": PATCHES[patch]["batch_size"],
            "iterations_per_epoch": iterations,
            "spatial_transforms": PATCHES[patch]["spatial_transforms"],
            "dataloader_kwargs": WORKERS[workers],
            "chunk_cache_mb": cache_mb,
            "spatial_transforms_on_device": workers == ON_DEVICE,
        }
    )


# --- Measurements, each in a child process -------------------------------------------------


def measure_loader(job: dict[str, Any]) -> dict[str, Any]:
    """Loader samples/s per timed epoch, and the read limit's when asked (one process only)."""
    from csc.data import build_loaders

    config = make_config(
        job["folder"],
        job["patch"],
        workers=job["workers"],
        iterations=job["iterations"],
        cache_mb=job["cache_mb"],
    )
    loader = build_loaders(config).train
    boxes = job["workers"] == ON_DEVICE
    rates = [_epoch_rate(loader, boxes=boxes) for _ in range(job["epochs"] + 1)][1:]  # warm-up
    result: dict[str, Any] = {"rates": rates}
    if boxes:  # what the training process's device step costs when that device is this CPU
        result["device_ms"] = _device_ms(loader)
    if job["limit"]:
        # Epochs 1.. again, the first a warm-up: exactly the loader's samples.
        result["limit_rates"] = read_limit(
            loader.dataset, config.batch_size, epochs=job["epochs"], cache_mb=job["cache_mb"]
        )
    return result


def _epoch_rate(loader: Any, *, boxes: bool = False) -> float:
    """Samples/s of an epoch; `boxes`: of the loader's boxes (spatial_transforms_on_device),
    before the training process resamples them on its device."""
    import torch

    start, count = time.perf_counter(), 0
    batches = torch.utils.data.DataLoader.__iter__(loader) if boxes else loader
    for batch in batches:
        count += len(batch["seed" if boxes else "input"])
    return count / (time.perf_counter() - start)


def _device_ms(loader: Any) -> float:
    """Median ms per batch of `csc.data.device.resample_on_device` on this CPU (one thread,
    as a loader would): what the device road would cost without a GPU."""
    import torch

    from csc.data.device import resample_on_device

    times = []
    for batch in torch.utils.data.DataLoader.__iter__(loader):
        start = time.perf_counter()
        resample_on_device(batch, loader.dataset, torch.device("cpu"))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def read_limit(train_set: Any, batch_size: int, *, epochs: int, cache_mb: int) -> list[float]:
    """Samples/s of plain tensorstore reads of each sample's axis-aligned boxes (raw and every
    annotated label, at the patch's own shape), a batch issued at once; after a warm-up epoch."""
    import tensorstore as ts

    context = ts.Context({"cache_pool": {"total_bytes_limit": cache_mb * 2**20}})
    stores: dict[str, Any] = {}
    rates = []
    for epoch in range(1, epochs + 2):
        start = time.perf_counter()
        for first in range(0, train_set.num_samples, batch_size):
            indices = range(first, min(first + batch_size, train_set.num_samples))
            futures = [
                f for i in indices for f in _patch_reads(train_set, epoch, i, stores, context)
            ]
            for future in futures:
                future.result()
        rates.append(train_set.num_samples / (time.perf_counter() - start))
    return rates[1:]


def _patch_reads(
    train_set: Any, epoch: int, index: int, stores: dict[str, Any], context: Any
) -> list[Any]:
    import tensorstore as ts

    crop_index, centre, _, _ = train_set.draw(epoch, index)
    crop = train_set.crops[crop_index]
    sources = [(crop.raw, train_set.spec.input)]
    sources += [(label, train_set.spec.target) for label in crop.labels if label is not None]
    futures = []
    for source, grid in sources:
        if source.url not in stores:
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": source.url + "/"}}
            stores[source.url] = ts.open(spec, read=True, context=context).result()
        box = _box(centre, grid, source.level)
        if box is not None:
            futures.append(stores[source.url][box].read())
    return futures


def _box(centre: Any, grid: Any, level: Any) -> tuple[slice, ...] | None:
    """The patch's axis-aligned voxel box in a level, (z, y, x), clipped; None if outside."""
    import numpy as np

    scale = np.asarray(level.scale)
    shape = np.maximum(np.rint(np.asarray(grid.shape) * np.asarray(grid.scale) / scale), 1)
    start = np.rint((centre - np.asarray(level.translation)) / scale - (shape - 1) / 2)
    low = np.clip(start, 0, level.shape).astype(int)
    high = np.clip(start + shape, 0, level.shape).astype(int)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def measure_rss(job: dict[str, Any]) -> dict[str, float]:
    """Peak RSS (MB) after imports, after building the loaders, after drawing the batches."""
    import tensorstore  # noqa: F401  (imported lazily by the loader; counted as a baseline)

    from csc.data import build_loaders

    imports = _peak_mb()
    config = make_config(
        job["folder"],
        "2D",
        workers="1 process",
        iterations=job["batches"],
        cache_mb=job["cache_mb"],
    )
    loaders = build_loaders(config)
    built = _peak_mb()
    for _ in loaders.train:
        pass
    num_crops = len(read_datasplit(config.datasplit_path))
    return {"imports": imports, "built": built, "drawn": _peak_mb(), "crops": num_crops}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CHILD_JOBS = {"loader": measure_loader, "rss": measure_rss}


def run_child(job: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Run `job` in a fresh interpreter (this file with --child); its last stdout line."""
    env = {**os.environ, "CSC_CACHE_DIR": str(cache_dir)}  # keep ~/.cache/csc untouched
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"child {job} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- The run -------------------------------------------------------------------------------


def loader_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = []
    for data in args.formats:
        for patch in args.patches:
            for workers in args.workers:
                if workers == ON_DEVICE and not PATCHES[patch]["spatial_transforms"]:
                    continue  # nothing to resample: the CPU path reads views
                iterations = {"2D": args.iterations_2d, "2D 256": args.iterations_2d // 4}.get(
                    patch, args.iterations_3d
                )
                cases.append(
                    {
                        "kind": "loader",
                        "data": data,
                        "patch": patch,
                        "workers": workers,
                        "iterations": iterations,
                        "epochs": args.epochs,
                        "limit": workers in ("1 process", ON_DEVICE) and not args.skip_limit,
                        "cache_mb": args.cache_mb,
                    }
                )
    return cases


def report_loader(case: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """A summary row: medians over processes of each process's median epoch (the ratio is
    the median of each process's ratio); prints every process's figures."""
    name = f"{case['patch']} {case['data']}, {case['workers']}"
    print(f"{name} ({len(results)} processes, epochs of {case['iterations']} batches):")
    rates, limits, ratios = [], [], []
    for result in results:
        rates.append(statistics.median(result["rates"]))
        line = f"  {rates[-1]:8.1f} samples/s (epochs: {_list(result['rates'])})"
        if "limit_rates" in result:
            limits.append(statistics.median(result["limit_rates"]))
            ratios.append(rates[-1] / limits[-1])
            line += f"; read limit {limits[-1]:.1f} (epochs: {_list(result['limit_rates'])})"
            line += f"; ratio {ratios[-1]:.2f}"
        if "device_ms" in result:
            line += f"; device step on this CPU {result['device_ms']:.1f} ms per batch"
        print(line)
    limit = f"{statistics.median(limits):.0f}" if limits else ""
    ratio = f"{statistics.median(ratios):.2f}" if ratios else ""
    target = ""
    if case["workers"] in ("1 process", ON_DEVICE):
        target = f"ratio >= {TARGET_RATIO}"
        if case["patch"] == "2D":
            target = f">= {TARGET_2D_RATE:.0f}/s, " + target
    spread = f"{min(rates):.0f}-{max(rates):.0f}" if len(rates) > 1 else ""
    return [name, f"{statistics.median(rates):.0f}", spread, limit, ratio, target]


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def report_rss(results: dict[str, dict[str, float]]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        print(
            f"{name} ({r['crops']:.0f} crops): peak RSS {r['imports']:.0f} MB after imports, "
            f"{r['built']:.0f} MB after building the loaders, {r['drawn']:.0f} MB after the "
            f"batches"
        )
        rows.append(
            [
                f"RSS, {r['crops']:.0f} crops",
                f"{r['imports']:.0f}",
                f"{r['built']:.0f}",
                f"{r['drawn']:.0f}",
            ]
        )
    small, large = results["rss-10"], results["rss-1000"]
    growth = (large["drawn"] - small["drawn"]) / (large["crops"] - small["crops"])
    built = (large["built"] - small["built"]) / (large["crops"] - small["crops"])
    verdict = "meets" if growth < TARGET_MB_PER_CROP else "MISSES"
    print(
        f"growth per crop: {growth:.3f} MB after the batches ({built:.3f} MB after building); "
        f"{verdict} the < {TARGET_MB_PER_CROP} MB target"
    )
    rows.append(["growth per crop (MB)", "", f"{built:.3f}", f"{growth:.3f}"])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def run(args: argparse.Namespace, folder: Path) -> None:
    names = ([] if args.skip_loaders else list(args.formats)) + (
        [] if args.skip_rss else ["rss-10", "rss-1000"]
    )
    prepare(folder, names)
    cache_dir = folder / "csc-cache"
    loader_rows, rss = [], {}
    if not args.skip_loaders:
        print(
            f"\n(a, b) training loader and read limit, {args.epochs} timed epochs after one "
            "warm-up epoch"
        )
        for case in loader_cases(args):
            repeats = args.repeats if case["workers"] in ("1 process", ON_DEVICE) else 1
            job = {**case, "folder": str(folder / case["data"])}
            results = [run_child(job, cache_dir) for _ in range(repeats)]
            loader_rows.append(report_loader(case, results))
    if not args.skip_rss:
        print(f"\n(c) peak RSS, 2D loader in one process, {args.rss_batches} batches of 8")
        for name in ("rss-10", "rss-1000"):
            job = {
                "kind": "rss",
                "folder": str(folder / name),
                "batches": args.rss_batches,
                "cache_mb": args.cache_mb,
            }
            rss[name] = run_child(job, cache_dir)
    print(f"\nsummary (chunk cache {args.cache_mb} MB per process, {os.cpu_count()} CPUs)")
    if loader_rows:
        print_table(
            ["case", "samples/s", "range over processes", "limit/s", "ratio", "target"], loader_rows
        )
    if rss:
        print()
        print_table(["memory", "imports MB", "built MB", "drawn MB"], report_rss(rss))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder to write data into, or reuse from")
    parser.add_argument("--quick", action="store_true", help="2 epochs, fewer batches (smoke)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs, after a warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="processes per one-process case")
    parser.add_argument("--iterations-2d", type=int, default=50, help="batches per 2D epoch")
    parser.add_argument("--iterations-3d", type=int, default=20, help="batches per 3D epoch")
    parser.add_argument("--rss-batches", type=int, default=100)
    parser.add_argument("--cache-mb", type=int, default=256, help="chunk cache per process")
    parser.add_argument("--skip-loaders", action="store_true", help="no (a) and (b)")
    parser.add_argument("--skip-limit", action="store_true", help="no (b)")
    parser.add_argument("--skip-rss", action="store_true", help="no (c)")
    parser.add_argument(
        "--formats", nargs="+", default=["zstd", "blosc-lz4"], choices=["zstd", "blosc-lz4"]
    )
    parser.add_argument("--patches", nargs="+", default=list(PATCHES), choices=list(PATCHES))
    parser.add_argument("--workers", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(CHILD_JOBS[job["kind"]](job)))
        return
    if args.quick:
        args.epochs, args.iterations_2d, args.iterations_3d, args.rss_batches = 2, 10, 5, 20
        args.repeats = 1
    if args.data:
        args.data.mkdir(parents=True, exist_ok=True)
        run(args, args.data.resolve())
        return
    with tempfile.TemporaryDirectory() as folder:
        run(args, Path(folder))


if __name__ == "__main__":
    main()
