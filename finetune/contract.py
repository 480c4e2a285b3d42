"""The contract between :func:`finetune.run.run_recipe` and a recipe kind's runner.

Every runner goes through the same three phases, as torchtune's recipe interface does:

1. **set up**: ``Runner(recipe, data, splits, device, cache, echo, options)`` loads and checks
   everything (models, negatives, the training stack) before the run directory exists, so bad
   input writes nothing;
2. **train**: ``runner.train(run_dir, start)``: :class:`Start` says how (fresh, resume a killed
   run, or adopt a sweep point's training);
3. **finish**: ``runner.finish(run_dir)`` chooses the merge scale, exports ``model/`` (unless
   :attr:`RunOptions.export` is False: a sweep point) and scores base and tuned on the test split,
   returning an :class:`~finetune.outcome.Outcome`.

This module sits below the kinds' packages, which import it; :mod:`finetune.kinds` names the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True)
class Start:
    """How a run's training starts: ``fresh``, ``resume`` (the run directory's newest checkpoint) or
    ``adopt`` (``point``, a sweep point's run directory whose training is this run's).

    Example:
        >>> Start.adopt(Path("runs/sweep/points/002")).mode
        'adopt'
    """

    mode: Literal["fresh", "resume", "adopt"] = "fresh"
    point: Path | None = None

    @classmethod
    def fresh(cls) -> Start:
        return cls()

    @classmethod
    def resume(cls) -> Start:
        return cls("resume")

    @classmethod
    def adopt(cls, point: Path) -> Start:
        return cls("adopt", Path(point))


@dataclass(frozen=True)
class RunOptions:
    """What the caller of a run decides, passed to the runner whole.

    Args:
        export: Write ``model/`` (False for a sweep point, which scores validation and writes no model).
        stop_behind: A sweep point of a kind that ``stops_behind``: the leader's validation curve
            (:class:`finetune.qlora.behind.Leader`) this point stops behind.
    """

    export: bool = True
    stop_behind: object | None = None


class Runner(Protocol):
    """What :func:`finetune.run.run_recipe` needs of a recipe kind's runner."""

    def __init__(self, recipe, data, splits, device: str, cache, echo=print, options: RunOptions = ...) -> None: ...

    def train(self, run_dir: Path, start: Start) -> None: ...

    def finish(self, run_dir: Path): ...  # -> finetune.outcome.Outcome
