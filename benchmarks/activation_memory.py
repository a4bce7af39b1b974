"""Peak memory and step time of training steps with `activation_checkpointing` off and on.

Run from the repository root:
    .venv/bin/python benchmarks/activation_memory.py [--model 3d_unet] [--shape 48 48 48]
        [--batch-size 2] [--model-kwargs '{"base_channels": 16}'] [--steps 3] [--device cpu]

Each setting runs in a fresh process: the model (a registry name with `model_kwargs`) takes
`steps` forward + backward + SGD steps on a random batch after one untimed step. Memory is the
peak over the timed steps: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs after the untimed step) minus
what it held before them. Prints one line per setting and the ratio; the outputs and
gradients of both are equal (tests/test_optim.py holds that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from csc.models import build_model, enable_activation_checkpointing


def host_peak_mib() -> float:
    """VmHWM, the process's peak resident set, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # KiB
    raise RuntimeError("no VmHWM in /proc/self/status: this measures host memory on Linux")


def host_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_host_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def measure(args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """One setting, in this process: peak MiB and seconds per step."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = json.loads(args.model_kwargs)
    model = build_model(args.model, num_classes=args.num_classes, **kwargs).to(device).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs = torch.randn(args.batch_size, 1, *args.shape, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(inputs).float().square().mean().backward()
        optimizer.step()

    step()  # untimed: allocator, gradients and optimizer state in place
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_host_peak()
        before = host_now_mib()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = host_peak_mib()
    seconds = (time.perf_counter() - started) / args.steps
    return {"checkpointing": checkpointing, "peak_mib": peak - before, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="3d_unet")
    parser.add_argument("--model-kwargs", default='{"base_channels": 8, "num_levels": 3}')
    parser.add_argument("--shape", type=int, nargs="+", default=[48, 48, 48])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one setting, in a fresh process
        print(json.dumps(measure(args, args.child == "on")))
        return
    results = {}
    for setting in ("off", "on"):
        command = [sys.executable, __file__, *sys.argv[1:], "--child", setting]
        # A fixed mmap threshold: glibc then returns every large freed block at once, so the
        # peak resident set follows the tensors alive (its default threshold grows with frees).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        output = done.stdout
        results[setting] = json.loads(output.strip().splitlines()[-1])
        print(
            f"activation_checkpointing {setting:>3}: peak {results[setting]['peak_mib']:8.1f} "
            f"MiB above the weights, {results[setting]['step_s']:.3f} s per step"
        )
    off, on = results["off"], results["on"]
    print(
        f"{args.model} {tuple(args.shape)} batch {args.batch_size} on {args.device}: "
        f"memory x{on['peak_mib'] / max(off['peak_mib'], 1e-9):.2f}, "
        f"time x{on['step_s'] / off['step_s']:.2f} with checkpointing"
    )


if __name__ == "__main__":
    main()
