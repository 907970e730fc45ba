"""torchrun / DDP plumbing: process group from the environment, one device per local rank, rank-0 I/O.

Outside torchrun (no `WORLD_SIZE` in the environment) everything degrades to a single process.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("crossmae_fast.train")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(local_rank: int = 0, device: str = "auto") -> torch.device:
    """`auto`: this local rank's GPU when CUDA is present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for, but CUDA is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (NCCL on GPUs, gloo on the CPU) when `WORLD_SIZE` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(local, device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (identity outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """`obj` of every rank, in rank order (`[obj]` outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one tiny all-reduce; used for stop decisions)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank."""
    return not all_true(not flag, device)


def all_sum(values: list[int], device: torch.device) -> list[int]:
    """`values` summed over the ranks (one small all-reduce and host read; call it at log steps only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_threads(threads: int, device: torch.device) -> None:
    """`threads=0`: torch's default, except 1 thread on a CPU whose load already fills its cores
    (OpenMP threads spinning against other processes make a step several times slower)."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if torch.get_num_threads() > 1 and load > cores - 0.5:
            torch.set_num_threads(1)
            log.info("CPU busy (load %.1f on %d cores): 1 torch thread (--threads N to choose)", load, cores)


def log_to_stdout() -> None:
    """A run's log on stdout with timestamps: progress from rank 0, only warnings from the other ranks."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
