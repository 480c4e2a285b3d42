"""Cost measurements: peak process memory, and time per optimizer step (evaluation excluded) for the trainer."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def seconds_per_step(train_seconds: float, train_steps: int, resumed_from: int | None) -> float | None:
    """Training seconds per step over the steps this process ran, evaluation and checkpointing included.

    A resumed run's seconds start at its checkpoint, so they are divided by the steps since then;
    a run that trained no step (a final run reusing a sweep point's training) has no such figure.

    Example::
        >>> seconds_per_step(430.0, 875, 660)
        2.0
        >>> seconds_per_step(0.1, 875, 875) is None
        True
    """
    ran = train_steps - (resumed_from or 0)
    return train_seconds / ran if ran > 0 else None


class StepTimer(TrainerCallback):
    """Times each optimizer step from ``on_step_begin`` to ``on_step_end``, so evaluation and
    checkpointing between steps are not counted. On CUDA it synchronises at both ends, because
    kernels run asynchronously and the host would otherwise time only their launch.

    Example (not run: it needs a model, data or a server)::
        timer = StepTimer(cuda=True)
        trainer.add_callback(timer); trainer.train(); timer.summary()["median_s"]
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.durations: list[float] = []
        self._start = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(self._now() - self._start)

    def summary(self) -> dict:
        """Steps timed, first step (compilation and warm-up land here), median and mean of the rest."""
        d = self.durations
        rest = d[1:] or d
        return {
            "steps_timed": len(d),
            "first_s": d[0] if d else None,
            "median_s": statistics.median(rest) if rest else None,
            "mean_s": statistics.fmean(rest) if rest else None,
        }
