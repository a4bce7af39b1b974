"""Data-parallel training under torchrun (docs/distributed.md): who this process is, the process
group and the collectives the loop needs (`csc.launch` starts the processes).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in each process it starts;
without them a process is rank 0 of 1 and every function here is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")
# A collective that waits this long means another rank is stuck; torchrun ends the group when
# a rank exits, so this only bounds the case where a rank hangs without dying.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank of world_size, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes TensorBoard and saves checkpoints."""
        return self.rank == 0


def from_env() -> Dist:
    """This process's place, from the variables torchrun sets (rank 0 of 1 without them)."""

    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.strip() else default

    world_size = number("WORLD_SIZE", 1)
    return Dist(
        rank=number("RANK", 0),
        world_size=world_size,
        local_rank=number("LOCAL_RANK", 0),
        local_world_size=number("LOCAL_WORLD_SIZE", world_size),
    )


def rank_device(place: Dist, device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's GPU, cuda:local_rank."""
    index = cast("int | None", device.index)  # torch's stub says int; it is None when unset
    if device.type == "cuda" and index is None:
        return torch.device("cuda", place.local_rank % max(torch.cuda.device_count(), 1))
    return device


def init(place: Dist, device: torch.device) -> None:
    """Join the process group: nccl between GPUs, gloo on CPU. No-op in a single process."""
    if not place.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)


def shutdown(place: Dist) -> None:
    """Leave the process group cleanly. Call after dropping every DDP model and optimizer:
    gloo ranks that exit with those alive, or without a barrier, can die at exit with
    "terminate called without an active exception"."""
    if not place.enabled or not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def barrier(place: Dist) -> None:
    if place.enabled:
        dist.barrier()


def reduce_sum(place: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, on its own device; itself in a single process."""
    if not place.enabled:
        return tensor
    work = tensor.to(_collective_device())  # nccl reduces CUDA tensors, gloo CPU ones
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def reduce_max(place: Dist, value: float) -> float:
    """The largest `value` over ranks."""
    if not place.enabled:
        return value
    work = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return float(work)


def broadcast_buffers(place: Dist, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP sends them only at
    the start of each training forward, so after an epoch's last batch each rank holds its
    own; validating with those would score a slightly different model on every rank."""
    if not place.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main_first(place: Dist, function: Callable[[], T]) -> T | None:
    """Run `function` on rank 0 while the others wait (e.g. writing the datasplit CSV they
    all read next); its result on rank 0, None elsewhere."""
    result = function() if place.is_main else None
    barrier(place)
    return result


def from_main(place: Dist, function: Callable[[], T]) -> T:
    """`function()` run on rank 0 alone and its result sent to every rank: what all ranks
    need from the data's metadata is read once, not once per rank. An error there is raised
    on every rank, so none waits for a result that never comes."""
    if not place.enabled:
        return function()
    box: list[Any] = [None]
    if place.is_main:
        try:
            box[0] = (True, function())
        except Exception as error:
            box[0] = (False, _picklable(error))
    dist.broadcast_object_list(box, src=0)
    succeeded, value = box[0]
    if not succeeded:
        raise value
    return value


def _picklable(error: Exception) -> Exception:
    """`error` itself if it survives pickling (to reach the other ranks), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def report_failure(place: Dist) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: an exception on one rank is printed with the rank's number and recorded in
    torchrun's error file (its summary then names the rank and shows the traceback), then
    re-raised so the process exits non-zero and torchrun stops the other ranks."""

    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            if not place.enabled:
                return function(*args, **kwargs)
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            handler = get_error_handler()
            handler.initialize()
            try:
                return function(*args, **kwargs)
            except Exception as error:
                lines = traceback.format_exception(error)
                print(
                    f"csc: rank {place.rank} of {place.world_size} failed:\n{''.join(lines)}",
                    file=sys.stderr,
                    flush=True,
                )
                handler.record_exception(error)
                raise

        return wrapper

    return decorate
