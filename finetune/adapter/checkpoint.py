"""The adapter loop's checkpoint: everything needed to continue a killed run exactly.

One file, ``<run_dir>/checkpoint/state.pt``, replaced atomically after every ``train.save_every``
epochs: the adapter, AdamW and the schedule, the sampling generator (batch order and negatives),
torch's global RNG (dropout), the history, and the best epoch so far. It holds only tensors,
numbers and strings, so it loads with ``torch.load(weights_only=True)``: no pickle is executed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.atomic import atomic_path
from finetune.errors import FinetuneError


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
