"""``python -m finetune sweep RECIPE key=v1,v2 ...``: settings chosen on validation, the test split scored once.

Every point of the grid is a normal run of the recipe on one shared ``splits.json``, in *selection*
mode: its validation queries stand in for the test split, nothing is exported, and the ``eval.also``
sets and ``merge`` wait for the final run. The point with the best validation NDCG@10 (ties: the
first in grid order) is then run once more as an ordinary run, which scores the test split (base and
tuned) for that point alone. No unselected point's test score exists to be read.

Frozen-encoder recipes read their embeddings from the cache at every point, so each point costs
its training only. A sweep directory resumes: run the same command with ``--dir`` set to it, and
finished points are read back instead of trained again; a QLoRA point cut off mid-training continues
from its newest checkpoint, as ``run --resume`` would.

Example (not run: it trains)::
    python -m finetune sweep recipes/adapter.yaml train.lr=3e-4,1e-3,3e-3 adapter.type=linear,mlp
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.atomic import write_json
from finetune.config import EvalConfig, MergeConfig
from finetune.errors import FinetuneError
from finetune.field_rules import default_override, ineffective
from finetune.kinds import KINDS
from finetune.recipe import load_recipe

NOT_SWEPT = ("eval.", "merge.", "splits.", "output.", "cache.", "name")
STOP_BEHIND = 0.02  # a qlora point more than this NDCG@10 behind the leader at the same epoch, twice in a row, stops


@dataclass
class Point:
    """One grid point: its settings (``{"train.lr": "1e-3"}``) and its validated recipe."""

    settings: dict[str, str]
    recipe: object

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


def split_values(text: str) -> list[str]:
    """Split ``v1,v2`` at top-level commas; commas inside ``[...]``, ``{...}`` or quotes stay.

    Example:
        >>> split_values("1e-3,3e-3"), split_values("[a,b],[c]"), split_values("'x,y'")
        (['1e-3', '3e-3'], ['[a,b]', '[c]'], ["'x,y'"])
    """
    out, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        current += ch
    return [*out, current.strip()]


def parse_grid(arguments: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(fixed overrides, grid)`` from ``key=value`` and ``key=v1,v2,...`` arguments."""
    fixed, grid = [], {}
    for arg in arguments:
        key, eq, value = arg.partition("=")
        values = split_values(value)
        if not eq or not key or any(v == "" for v in values):
            raise FinetuneError(f"'{arg}' lists no value; write key=v1,v2,...", where="sweep")
        if len(values) > 1 and key.startswith(NOT_SWEPT):
            why = (
                "eval.also and merge apply to the chosen point's final run (merge.scale auto already chooses s on "
                "validation)"
                if key.startswith(("eval.", "merge."))
                else "the splits, name, cache and outputs are the sweep's own"
            )
            raise FinetuneError(f"{key} is not swept: {why}; give it one value", where="sweep")
        if len(values) == 1:
            fixed.append(arg)
        elif key in grid:
            raise FinetuneError(f"{key} is given twice; list all its values in one key=v1,v2,...", where="sweep")
        else:
            grid[key] = values
    if not grid:
        raise FinetuneError("no key lists two or more values, so there is nothing to choose; e.g. train.lr=1e-3,3e-3")
    return fixed, grid


def plan_points(path: str, arguments: list[str], budget: int | None = None) -> tuple[object, list[Point], list[str]]:
    """The recipe with the fixed overrides, every grid point (or ``budget`` of them) validated, and notes.

    Every point is validated before anything runs, so a wrong key (did-you-mean), a value of the
    wrong type or a setting that has no effect at some point stops the sweep with one line.
    """
    fixed, grid = parse_grid(arguments)
    recipe = load_recipe(path, fixed)
    if not KINDS[recipe.kind].sweepable:
        raise FinetuneError(KINDS[recipe.kind].not_sweepable, where=path)
    if recipe.splits.val_fraction <= 0 and not recipe.splits.file:
        raise FinetuneError("a sweep chooses on validation queries; set splits.val_fraction above 0", where=path)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if budget is not None:
        if budget < 1:
            raise FinetuneError(f"--budget must be at least 1, got {budget}", where="sweep")
        keep = sorted(random.Random(recipe.seed).sample(range(len(combos)), min(budget, len(combos))))
        combos = [combos[i] for i in keep]
    points, notes = [], {}
    for settings in combos:
        point = resolve_point(path, fixed, settings, notes)
        if all(p.settings != point.settings for p in points):  # points that differ only in moot keys run once
            points.append(point)
    return recipe, points, list(notes)


def resolve_point(path: str, fixed: list[str], settings: dict[str, str], notes: dict) -> Point:
    """A grid point's recipe. A field that has no effect at this point (``negatives.per_query`` where
    ``negatives.strategy=none``) goes back to its default, and a swept one shows ``-``: sweeping
    ``negatives.strategy=none,random`` needs no second sweep. What was reset is noted, once each."""
    label = " ".join(f"{k}={v}" for k, v in settings.items())
    overrides, effective = fixed + [f"{k}={v}" for k, v in settings.items()], dict(settings)
    try:
        loose = load_recipe(path, overrides, check=False)
        for rule, value, default in ineffective(loose, KINDS[loose.kind].field_rules()):
            reset = default_override(rule, default)
            if reset is None:  # a whole section: the strict load below says what to remove
                continue
            overrides.append(reset)
            if rule.path in settings:
                effective[rule.path] = "-"
            else:
                where = "at the points where it has none, it stays at its default"
                notes[f"{rule.path}={value} has no effect unless {rule.when}; {where}"] = None
        return Point(effective, load_recipe(path, overrides))
    except FinetuneError as exc:
        raise FinetuneError(f"{exc.message} (at the point {label})", where=exc.where) from None


def stop_margin(kind: str, stop_behind: float | None, path: str) -> float | None:
    """The margin behind the leader at which a point stops (None: points train to the end)."""
    if stop_behind is not None and stop_behind < 0:
        raise FinetuneError(f"--stop-behind is an NDCG@10 margin, 0 or more; got {stop_behind}", where="sweep")
    if not KINDS[kind].stops_behind:
        if stop_behind:
            raise FinetuneError(
                "--stop-behind is for qlora sweeps; adapter points train in seconds and stop on their own "
                "validation (train.patience); drop --stop-behind",
                where=path,
            )
        return None
    margin = STOP_BEHIND if stop_behind is None else stop_behind
    return margin or None


def leader_of(out: Path, rows: list[dict], margin: float | None):
    """The best finished point's validation curve, for the next point to keep up with (None: nothing to follow)."""
    if margin is None or not rows:
        return None
    from finetune.qlora.behind import Leader, validation_curve

    best = max(rows, key=lambda r: r["val_ndcg@10"])
    history = json.loads((out / best["run"] / "metrics.json").read_text()).get("log_history", [])
    curve = validation_curve(history)
    return Leader(curve, margin) if curve else None


def point_checkpoint(point: Path, kind: str) -> Path | None:
    """The newest checkpoint a point kept (None: none kept, or a kind whose points retrain in seconds)."""
    return KINDS[kind].latest_checkpoint(point)


def reusable_training(point: Path, kind: str, echo) -> Path | None:
    """The chosen point's run directory, when the final run can take over its training (qlora, checkpoints kept)."""
    if not KINDS[kind].reuses_training:
        return None
    if point_checkpoint(point, kind) is None:
        echo(f"{point} kept no checkpoint, so the final run trains the chosen point again")
        return None
    return point


def unfinished_training(point: Path, kind: str) -> Path | None:
    """The newest checkpoint of a QLoRA point cut off mid-training (None: start the point afresh).

    A 3-epoch point on a large set can take an hour on a CPU, or outlast a GPU lease, so a resumed
    sweep continues it like ``run --resume``.
    """
    return point_checkpoint(point, kind) if (point / "recipe.yaml").is_file() else None


def run_point(recipe, splits_file: Path, run_dir: Path, command: str, label: str, echo=print, stop_behind=None):
    """Train one point and score its validation queries only, continuing a point cut off mid-training.

    Args:
        recipe: The point's recipe (:func:`as_point` is applied here).
        splits_file: The splits every point and the final run share.
        run_dir: The point's run directory.
        command: Recorded in the run directory.
        label: How the cut-off line names the point, e.g. ``point 3``.
        echo: Where that line goes (the run itself prints nothing).
        stop_behind: A qlora point: the leader's validation curve (:func:`finetune.qlora.behind.Leader`).
    """
    from finetune.run import run_recipe

    partial = unfinished_training(run_dir, recipe.kind)
    if partial is not None:
        echo(f"  {label} was cut off; continuing from {partial.name}")
    run_recipe(
        as_point(recipe, splits_file),
        run_dir=str(run_dir),
        resume=str(run_dir) if partial is not None else None,
        overwrite=partial is None,
        selection=True,
        echo=lambda *_: None,
        command=command,
        stop_behind=stop_behind,
    )


def run_final(recipe, splits_file: Path, point: Path, run_dir: Path, command: str, echo=print) -> None:
    """The chosen point's final run on the shared splits: its training taken over where it can be, test scored once."""
    from finetune.run import run_recipe

    final = recipe.model_copy(update={"splits": recipe.splits.model_copy(update={"file": str(splits_file)})})
    adopt = reusable_training(point, recipe.kind, echo)
    run_recipe(final, run_dir=str(run_dir), overwrite=True, echo=echo, command=command, adopt=adopt)


def as_point(recipe, splits_file: Path):
    """A point's recipe for selection: the sweep's splits, no extra sets and no merge (the final run has them)."""
    update = {"splits": recipe.splits.model_copy(update={"file": str(splits_file)})}
    if "merge" in type(recipe).model_fields:
        update["merge"] = MergeConfig()
    return recipe.model_copy(update={**update, "eval": EvalConfig()})


def run_sweep(
    path: str,
    arguments: list[str],
    budget: int | None = None,
    directory: str | None = None,
    echo=print,
    command: str = "",
    stop_behind: float | None = None,
) -> Path:
    """Run the sweep; return its directory (``sweep.json``, ``sweep.md``, ``sweep.png``, ``points/``, ``final/``).

    Args:
        path: The recipe YAML (adapter or qlora).
        arguments: ``key=v1,v2,...`` (swept) and ``key=value`` (fixed) overrides.
        budget: Run this many points of the grid, drawn with the recipe's seed.
        directory: The sweep directory; one holding the same plan resumes.
        echo: Where progress lines and the table go.
        command: The command line, recorded in every run directory.
        stop_behind: qlora sweeps: a point stops when its best validation NDCG@10 trails the best
            finished point's, by the same epoch, by more than this at two evaluations in a row
            (default 0.02; 0 trains every point to the end). Not for adapter sweeps, whose points
            take seconds.
    """
    from finetune.sweep_report import write_report

    recipe, points, notes = plan_points(path, arguments, budget)
    margin = stop_margin(recipe.kind, stop_behind, path)
    KINDS[recipe.kind].preload(recipe)  # before anything imports transformers
    plan = {"recipe": path, "arguments": arguments, "budget": budget, "points": [p.settings for p in points]}
    if margin is not None:
        plan["stop_behind"] = margin
    out = (
        Path(directory)
        if directory
        else Path(recipe.output.dir) / f"{recipe.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    splits_file = _sweep_directory(out, plan, recipe, echo)
    for note in notes:
        echo(f"sweep: {note}")
    echo(
        f"sweep: {len(points)} points, chosen on validation NDCG@10; each point scores its validation queries with "
        "no export, eval.also or merge, which the chosen point's final run applies"
    )
    rows = []
    for i, point in enumerate(points):
        run_dir = out / "points" / f"{i:03d}"
        if not (run_dir / "metrics.json").is_file():
            command_i = f"{command}  # point {i}: {point.label()}"
            run_point(point.recipe, splits_file, run_dir, command_i, f"point {i}", echo, leader_of(out, rows, margin))
        rows.append(_point_row(i, point, run_dir, out))
        stopped = rows[-1]["stopped_behind"]
        why = f" (stopped at epoch {stopped['epoch']:.2f}: behind the leader)" if stopped else ""
        echo(f"  [{i + 1}/{len(points)}] {point.label()}: val NDCG@10 {rows[-1]['val_ndcg@10']:.4f}{why}")
    best = max(rows, key=lambda r: r["val_ndcg@10"])  # max keeps the first of equals: grid order
    chosen = points[best["point"]].recipe
    echo(f"chosen on validation: {points[best['point']].label()}; its final run scores the test split")
    if not (out / "final" / "metrics.json").is_file():
        run_final(chosen, splits_file, out / best["run"], out / "final", f"{command}  # final run", echo)
    write_report(out, plan, rows, best, json.loads((out / "final" / "metrics.json").read_text()), echo)
    return out


def _sweep_directory(out: Path, plan: dict, recipe, echo=print) -> Path:
    """Start the sweep in ``out`` (its plan and the split every point shares), or resume the same plan there;
    return the splits file."""
    from finetune.data import load_data
    from finetune.splits import make_splits

    splits_file = out / "splits.json"
    if (out / "plan.json").is_file():
        if json.loads((out / "plan.json").read_text()) != plan:
            raise FinetuneError("holds a different sweep; pass a new --dir, or the same command", where=str(out))
        echo(f"resuming the sweep in {out}")
    else:
        if out.exists() and any(out.iterdir()):
            raise FinetuneError("exists and is not a sweep directory; pass a new --dir", where=str(out))
        splits = make_splits(load_data(recipe.data), recipe.splits, recipe.seed)
        splits.save(splits_file)
        write_json(out / "plan.json", plan)
    return splits_file


def _point_row(i: int, point: Point, run_dir: Path, out: Path) -> dict:
    """A finished point's row of the sweep table, read from its ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "point": i,
        "settings": point.settings,
        "val_ndcg@10": metrics["tuned"]["ndcg@10"],
        "base_val_ndcg@10": metrics["base"]["ndcg@10"],
        "seconds": metrics["wall_seconds"],
        "run": str(run_dir.relative_to(out)),
        "stopped_behind": metrics.get("stopped_behind"),
        # a resumed point's wall_seconds are the resumed call's only: the table says so
        "resumed_from_step": metrics.get("resumed_from_step"),
    }
