"""How long `csc --help` and `csc config` take to start, against a bare interpreter.

Run: .venv/bin/python benchmarks/cli_startup.py [--runs 20]
Target (issue: foundation): `csc --help` under 0.3 s. Prints medians in seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall time of `runs` runs of `command`, after one warm-up run."""
    subprocess.run(command, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    csc = shutil.which("csc", path=str(Path(sys.executable).parent)) or "csc"
    cases = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "csc --help": [csc, "--help"],
        "csc config examples/train_2D.py": [csc, "config", str(ROOT / "examples/train_2D.py")],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }
    print(f"median of {args.runs} runs")
    results = {name: median_seconds(command, args.runs) for name, command in cases.items()}
    for name, seconds in results.items():
        print(f"{name:<40} {seconds:6.3f} s")
    verdict = "meets" if results["csc --help"] < 0.3 else "MISSES"
    print(f"csc --help {verdict} the 0.3 s target")


if __name__ == "__main__":
    main()
