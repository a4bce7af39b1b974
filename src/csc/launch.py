"""`csc train --nproc N`: the same command in N processes on this machine, through torchrun.

No torch import here: the launching process only waits for torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(nproc: int, arguments: Sequence[str]) -> list[str]:
    """torchrun for one machine (--standalone: a free local port) running `csc ARGUMENTS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "csc",
        *arguments,
    ]


def launch(nproc: int, arguments: Sequence[str]) -> int:
    """Run `csc ARGUMENTS` in `nproc` processes; torchrun's exit status. Each process gets an
    equal share of the cores for torch's threads unless OMP_NUM_THREADS is set (torchrun
    alone would give each one thread)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(nproc, arguments), env=env, check=False).returncode
