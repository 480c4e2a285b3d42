"""Several processes, one run: rank 0 owns the run directory, every rank trains.

Under ``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N`` each process runs
the same command. The process group is started here, before Hugging Face's trainer would, so the
run directory chosen by rank 0 can be broadcast to the others; ``accelerate`` picks the existing
group up. CPU processes talk over gloo, GPUs over NCCL.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in a single process, and in rank 0 of several: the one process that writes outputs."""
    return rank() == 0


def init(device: str) -> None:
    """Join the launcher's process group (no-op in a single process)."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def share(value):
    """Rank 0's ``value``, on every rank (e.g. the run directory's path)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
