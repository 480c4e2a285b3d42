"""What a run produced, and the epilogue every runner shares.

Every kind ends the same way: choose the merge scale on validation (where the kind merges), score
base and tuned on the test split with per-query rows, and score the ``eval.also`` sets. A runner
supplies how to score its model (a split, or an extra set's split -> the evaluator's metrics) and,
where merging applies, ``at(s)``: a context in which that model is at scale s. This module does the
rest once, and :class:`Outcome` carries the result to :func:`finetune.run.run_recipe`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune import distributed
from finetune.extra_sets import ExtraSet, score_extra_sets
from finetune.merge_scale import choose_scale, merge_line, plot_tradeoff

Score = Callable[[str, "ExtraSet | None"], dict]
"""``score(split, extra)``: the evaluator's metrics of the runner's model as it is now, on ``split``
(``"val"`` or ``"test"``) of the run's data (``extra`` None) or of an ``eval.also`` set."""


@dataclass
class Outcome:
    """A finished run: base and tuned test metrics (with per-query rows) and what the kind records.

    Args:
        base: The evaluator's metrics of the model the user gave (``per_query`` attached).
        tuned: The same for the exported model.
        record: The kind's own fields for ``metrics.json`` (backend, history, export checks, ...).
        also: ``eval.also`` rows (:func:`score_also`).
        merge: The merge-scale choice (:func:`choose_merge`); None for a kind that does not merge.
        matryoshka: NDCG@10 at each ``loss.matryoshka_dims`` size, base and tuned.
        seconds: Where the run's time went, by stage.
        exported: The ``SentenceTransformer`` that ``model/`` holds, for its card; None when nothing was exported.
        card: What the kind says of that model in its card (:func:`finetune.model_card.write_model_card`):
            ``base``, ``base_label``, ``method``, ``changed``.
    """

    base: dict
    tuned: dict
    record: dict = field(default_factory=dict)
    also: dict = field(default_factory=dict)
    merge: dict | None = None
    matryoshka: dict | None = None
    seconds: dict = field(default_factory=dict)
    exported: object = None
    card: dict = field(default_factory=dict)

    def per_query(self) -> dict | None:
        """``{"base": rows, "tuned": rows}`` for ``per_query.jsonl`` and the paired significance test."""
        rows = getattr(self.base, "per_query", None), getattr(self.tuned, "per_query", None)
        return {"base": rows[0], "tuned": rows[1]} if all(rows) else None

    def metrics(self) -> dict:
        """The fields ``metrics.json`` holds for this outcome (``run_recipe`` adds the run's own)."""
        out = {"base": self.base, "tuned": self.tuned, **self.record, "also": self.also}
        out |= {k: v for k, v in (("merge", self.merge), ("matryoshka", self.matryoshka)) if v is not None}
        return out | {"seconds": self.seconds}


def score_also(extra: list[ExtraSet], base: Score, tuned: Score) -> tuple[dict, float]:
    """The ``eval.also`` rows, base and tuned, on each set's test split; and the seconds they took."""
    t0 = time.perf_counter()
    scores = {"base": base, "tuned": tuned}
    also = score_extra_sets(extra, lambda x, which: scores[which]("test", x))
    return also, time.perf_counter() - t0


def choose_merge(
    recipe, at, score: Score, extra: list[ExtraSet], run_dir: Path, what: str, echo=print
) -> tuple[float, dict]:
    """``merge.scale``: s, chosen on validation when ``auto``, and the record of the choice.

    Rank 0 chooses (other ranks take its s); the test split is scored at s = 1 once s is chosen,
    for the record only. The caller then puts its model at s.

    Args:
        recipe: The recipe (``merge``, ``name``).
        at: ``at(s)``: a context in which ``score`` sees the model at scale s.
        score: Scores the model as it is now (see :data:`Score`).
        extra: The ``eval.also`` sets, whose validation drops ``merge.max_drop`` bounds.
        run_dir: Where ``merge.png`` goes (with extra sets).
        what: What s scales, for the plot's title (``adapter residual``).
        echo: Where the one line about s goes.

    Returns:
        ``(s, record)``; the record is ``{"scale": 1.0}`` when ``merge.scale`` is 1.
    """
    config = recipe.merge
    if config.scale == 1.0:
        return 1.0, {"scale": 1.0}
    grid, chosen, seconds, unscaled = None, config.scale, 0.0, {}

    def scores(split: str) -> dict[str, float]:
        return {"in_domain": score(split, None)["ndcg@10"]} | {x.label: score(split, x)["ndcg@10"] for x in extra}

    def validate(s: float) -> dict[str, float]:
        with at(s):
            return scores("val")

    main = distributed.is_main()
    if config.scale == "auto" and main:
        t0 = time.perf_counter()
        chosen, grid = choose_scale(config.grid, validate, config.max_drop)
        seconds = time.perf_counter() - t0
        if extra:
            plot_tradeoff(grid, chosen, run_dir / "merge.png", f"{recipe.name}: {what} x s")
    if main:
        with at(1.0):  # chosen already: s = 1 on test is a reference row, never an input to the choice
            unscaled = scores("test")
    chosen = distributed.share(chosen)
    echo(merge_line(chosen, grid is not None, unscaled))
    record = {"scale": chosen, "max_drop": config.max_drop, "grid": grid, "seconds": seconds}
    return chosen, record | {"test_at_scale_1": unscaled}


@contextlib.contextmanager
def swapped(owner, name: str, value):
    """A context in which ``owner.name`` is ``value`` (restored after): how a runner's ``at(s)`` swaps
    in the model at scale s."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)
