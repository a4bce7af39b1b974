"""What a run ran with, and running it again the same way (docs/training.md#reproducibility).

`run_record` gathers, at a run's start, the package versions, the git commit of the config's
folder (and of csc's own source, when it is a checkout), the machine and the full resolved
config; the training loop logs it to TensorBoard and writes it beside the checkpoints.
`deterministic_mode` switches torch to deterministic algorithms for the run (`deterministic`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from csc.config import TrainConfig, config_to_dict

RECORD_VERSION = 1  # the layout of a run record; raised when a key changes meaning
PACKAGES = ("torch", "csc", "numpy", "tensorstore", "zarr")  # their versions go in the record
GIT_TIMEOUT_S = 10.0  # one git call; a hung git (network file system) must not stop training
# cuBLAS's workspace setting that makes its matrix products deterministic (torch's docs,
# "Reproducibility"); set for a deterministic run unless the user set it.
CUBLAS_WORKSPACE = ":4096:8"


def run_record(
    config: TrainConfig,
    *,
    device: torch.device,
    world_size: int = 1,
    resumed_epoch: int = 0,
    global_step: int = 0,
    loaded_from: str | None = None,
) -> dict[str, Any]:
    """The record of one start of a run: when, from where (epoch 0: a fresh start; the
    checkpoint file it loaded, if any), on what, with which code and which settings. Plain
    data: it goes into JSON as it is."""
    config_dir = Path(config.config_path).parent if config.config_path else None
    return {
        "record_version": RECORD_VERSION,
        "model_name": config.model_name,
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "resumed_from": {"epoch": resumed_epoch, "global_step": global_step},
        "loaded_from": loaded_from,  # a resumed or fine-tuned-from checkpoint file
        "command": list(sys.argv),
        "versions": package_versions(),
        "git": {
            "config": None if config_dir is None else git_state(config_dir),
            "csc": git_state(Path(__file__).parent),  # None for an installed wheel
        },
        "machine": machine(device, world_size=world_size),
        "deterministic": config.deterministic,
        "config_path": config.config_path,
        "config": config_to_dict(config),
    }


def package_versions() -> dict[str, str | None]:
    """Python's and each of `PACKAGES`' installed version; None for one not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The commit checked out in the git repository holding `folder`, its root, and whether
    tracked files differ from it (``dirty``; untracked files do not count). None when
    `folder` is in no repository, the repository has no commit yet, or git is missing."""
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "root": _git(folder, "rev-parse", "--show-toplevel"),
    }


def _git(folder: str | os.PathLike[str], *args: str) -> str | None:
    """git's output in `folder`, stripped; None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", "-C", os.fspath(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine(device: torch.device, *, world_size: int = 1) -> dict[str, Any]:
    """Host name, platform, CPU count, the training device and, when CUDA is there, its CUDA
    and cuDNN versions and GPU names."""
    cuda = torch.cuda.is_available()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "world_size": world_size,  # training processes (torchrun)
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None: a CPU build
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
    }


def record_markdown(record: dict[str, Any], text: str) -> str:
    """The record as TensorBoard's text plugin shows it: a line of the essentials, then the
    whole JSON `text` as a code block."""
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v is not None)
    git = record["git"]["config"]
    where = "no git repository" if git is None else f"commit {git['commit'][:12]}"
    if git is not None and git["dirty"]:
        where += " (uncommitted changes)"
    return f"{versions}; config: {where}; device {record['machine']['device']}\n\n```\n{text}\n```"


@contextlib.contextmanager
def deterministic_mode(setting: bool | str) -> Iterator[None]:
    """With `setting` True or "warn": deterministic algorithms (True: an op that has none
    raises; "warn": it warns), no cuDNN benchmark and deterministic cuDNN, cuBLAS's
    deterministic workspace (``CUBLAS_WORKSPACE_CONFIG``, unless set) for the body; torch's
    previous settings afterwards (they are process-wide). False: nothing changes."""
    if not setting:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:  # read when cuBLAS starts; harmless without CUDA
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=setting == "warn")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
