"""Where a run's time went: named stages, timed exclusively, tabulated at the end of the run.

A run opens a :class:`Stages` clock (``with Stages() as clock``); code anywhere below it marks
its work with ``with stage("mining"):``. Stages nest, and time is charged to the innermost open
one only: a validation evaluation inside training counts as ``validation``, not ``training``,
so the shares add up to the wall time (the rest is ``other``). Outside a clock, ``stage`` does
nothing, so library functions can mark themselves without knowing who calls them.

Example:
    >>> import time
    >>> with Stages() as clock:
    ...     with stage("training"):
    ...         with stage("validation"):
    ...             time.sleep(0.02)
    >>> clock.record()["validation"]["calls"], clock.record()["training"]["seconds"] < 0.02
    (1, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass

from finetune.timing import peak_rss_mb

_CURRENT: contextvars.ContextVar[Stages | None] = contextvars.ContextVar("finetune_stages", default=None)


@dataclass
class _Total:
    seconds: float = 0.0
    calls: int = 0
    peak_rss_mb: float = 0.0  # the process's peak so far when this stage last ended


class Stages:
    """A clock of named stages (see the module docstring); ``record()`` is what ``metrics.json`` keeps."""

    def __init__(self):
        self.totals: dict[str, _Total] = {}
        self._open: list[str] = []
        self._since = 0.0
        self._start = 0.0
        self.wall = 0.0

    def __enter__(self) -> Stages:
        self._token = _CURRENT.set(self)
        self._start = self._since = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._charge()
        self.wall = time.perf_counter() - self._start
        _CURRENT.reset(self._token)

    def _charge(self) -> None:
        """Add the time since the last change to the innermost open stage (or to nothing: ``other``)."""
        now = time.perf_counter()
        if self._open:
            self.totals.setdefault(self._open[-1], _Total()).seconds += now - self._since
        self._since = now

    @contextlib.contextmanager
    def stage(self, name: str):
        self._charge()
        self._open.append(name)
        total = self.totals.setdefault(name, _Total())
        total.calls += 1
        try:
            yield
        finally:
            self._charge()
            self._open.pop()
            total.peak_rss_mb = peak_rss_mb()

    def record(self) -> dict:
        """``{stage: {"seconds", "calls", "share", "peak_rss_mb"}}`` in the order the stages first ran, plus
        ``other`` (time in no stage); shares are of the wall time (the clock's, or so far if still open)."""
        wall = self.wall or (time.perf_counter() - self._start)
        rows = {name: vars(t).copy() for name, t in self.totals.items()}
        rows["other"] = {"seconds": max(0.0, wall - sum(t.seconds for t in self.totals.values())), "calls": 0}
        for row in rows.values():
            row["share"] = row["seconds"] / wall if wall > 0 else 0.0
        return rows


def stage(name: str):
    """Charge the time inside ``with stage(name):`` to ``name`` on the open clock; nothing without one."""
    clock = _CURRENT.get()
    return clock.stage(name) if clock is not None else contextlib.nullcontext()


def stage_table(record: dict) -> str:
    """The record as the lines printed at the end of a run.

    Example:
        >>> print(stage_table({"training": {"seconds": 30.0, "calls": 1, "share": 0.75},
        ...                    "validation": {"seconds": 10.0, "calls": 4, "share": 0.25}}))
        where the time went (40 s):
          training      30.0 s   75%
          validation    10.0 s   25%  (4 calls, 2.5 s each)
    """
    wall = sum(row["seconds"] for row in record.values())
    width = max(len(name) for name in record)
    lines = [f"where the time went ({wall:.0f} s):"]
    for name, row in record.items():
        if name == "other" and row["seconds"] < 0.05:
            continue
        each = f"  ({row['calls']} calls, {row['seconds'] / row['calls']:.1f} s each)" if row["calls"] > 1 else ""
        lines.append(f"  {name:<{width}} {row['seconds']:>7.1f} s {100 * row['share']:>4.0f}%{each}")
    return "\n".join(lines)
