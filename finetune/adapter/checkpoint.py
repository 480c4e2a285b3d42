"""The adapter loop's checkpoint: everything needed to continue a killed run exactly.

One file, ``<run_dir>/checkpoint/state.pt``, replaced atomically after every ``train.save_every``
epochs: the adapter, AdamW and the schedule, the sampling generator (batch order and negatives),
torch's global RNG (dropout), the history, and the best epoch so far. It holds only tensors,
numbers and strings, so it loads with ``torch.load(weights_only=True)``: no pickle is executed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.atomic import atomic_path
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)


def save_training_state(path: Path, state: dict) -> None:
    """Atomically write ``state`` (a dict of tensors, numbers, strings, lists and dicts)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict:
    """The state written by :func:`save_training_state`; a damaged file is a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, or not ours: never fall back to unsafe loading
        raise FinetuneError(
            f"cannot read the checkpoint ({type(exc).__name__}); delete it to restart training from the beginning",
            where=str(path),
        ) from None


def restore(
    state: dict, adapter, optimizer, schedule, generator: torch.Generator, where: Path | str = "checkpoint"
) -> None:
    """Put a saved state back into live objects; a shape mismatch names the file and the fix."""
    mine = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["adapter"].items()}
    if mine != theirs:
        key = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)))
        raise FinetuneError(
            f"adapter weights do not fit this recipe's adapter ({key}: {theirs.get(key)} saved, {mine.get(key)} "
            "expected); resume with the recipe that made them",
            where=str(where),
        )
    adapter.load_state_dict(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])


@dataclass
class TrainState:
    """Everything the adapter loop carries from epoch to epoch, written and read here only (as
    nanoGPT's ``train.py`` keeps its checkpoint in one place).

    Args:
        adapter, optimizer, schedule, generator: The live training objects.
        history: One row per finished epoch (epoch 0: before training).
        best: The best validation NDCG@10 so far (None without validation).
        best_state: The adapter's weights at ``best_epoch``.
        best_epoch: The epoch kept so far.
        stale: Epochs since the last gain (early stopping counts them).
    """

    adapter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    history: list
    best: float | None = None
    best_state: dict | None = None
    best_epoch: int = 0
    stale: int = 0

    @property
    def epoch(self) -> int:
        return self.history[-1]["epoch"]

    def record(self, epoch: int, loss: float | None, score: float | None) -> None:
        """Log a finished epoch (its mean loss and validation NDCG@10) and keep it if it is the best."""
        self.history.append({"epoch": epoch, "loss": loss, "val_ndcg@10": score})
        self.keep(epoch, score)

    def restore_best(self) -> None:
        """Put the kept epoch's weights back in the adapter (in eval mode)."""
        self.adapter.load_state_dict(self.best_state)
        self.adapter.eval()
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        logger.info("kept epoch %d (val NDCG@10 %s)", self.best_epoch, best)

    def keep(self, epoch: int, score: float | None) -> None:
        """Keep this epoch's weights when it beats the best so far (without validation, the last epoch)."""
        if score is None or self.best_state is None or score > self.best:  # epoch 0 sets the first best
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        else:
            self.stale += 1

    def to_dict(self) -> dict:
        """The checkpoint's contents: tensors, numbers and strings only (``weights_only`` loading)."""
        return {
            "epoch": self.epoch,
            "adapter": self.adapter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
        }

    def load_dict(self, saved: dict, where: Path | str = "checkpoint") -> None:
        """Continue from ``saved`` (:meth:`to_dict` of a killed run): weights, optimizer, RNGs and the best so far."""
        restore(saved, self.adapter, self.optimizer, self.schedule, self.generator, where)
        self.history, self.best, self.best_state = saved["history"], saved["best"], saved["best_state"]
        self.best_epoch, self.stale = saved["best_epoch"], saved["stale"]
