"""Crawl 200 crops x 5 classes on a local S3 server (moto, 127.0.0.1): wall time and requests.

Run from the repository root: .venv/bin/python benchmarks/datasplit_s3.py [--runs 5]
Writes tiny `csc synth` data (10 datasets x 20 crops, every class annotated), uploads it to a
public bucket on a local S3 server, then times `csc.datasplit.crawl` with a fresh client each
run, next to fsspec's generic `glob` of the same pattern for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # for tests.s3server

from csc.datasplit import CrawlOptions, crawl
from csc.storage import s3_filesystem
from csc.synth import SynthSpec, write_synthetic
from tests.s3server import moto_server, upload_tree

CLASSES = ("nuc", "mito", "er", "ves", "lyso")
SPEC = SynthSpec(
    num_datasets=10,
    num_crops=20,
    shape=(16, 32, 32),
    crop_shape=(8, 16, 16),
    chunks=(4, 8, 8),  # several chunk files per array: a crawl must not list them
    classes=CLASSES,
    missing_class_prob=0.0,
)
SEARCH = "s3://crawl-bench/{dataset}/{dataset}.zarr/recon-1/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, moto_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            os.environ.pop(name, None)
        start = time.perf_counter()
        write_synthetic(folder, SPEC)
        num_objects = upload_tree(endpoint, Path(folder), "crawl-bench", public=True)
        print(f"uploaded {num_objects} objects in {time.perf_counter() - start:.1f} s")
        times, report = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            report = crawl(CrawlOptions(search_path=SEARCH, classes=CLASSES))
            times.append(time.perf_counter() - start)
        assert report is not None
        num_pairs = sum(len(r.classes) for r in report.crops)
        print(
            f"csc crawl: {len(report.crops)} crops, {num_pairs} crop-class groups, "
            f"{report.num_requests} list requests, median {statistics.median(times):.3f} s "
            f"over {args.runs} runs (min {min(times):.3f} s)"
        )
        start = time.perf_counter()
        pattern = SEARCH.removeprefix("s3://").replace("{dataset}", "*")
        found = s3_filesystem().glob(pattern.replace("{name}", "labels/groundtruth/*/*"))
        print(
            f"fsspec glob of the same pattern: {len(found)} paths in "
            f"{time.perf_counter() - start:.3f} s (one run)"
        )


if __name__ == "__main__":
    main()
