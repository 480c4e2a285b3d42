"""Run any recipe: load data, make splits, prepare the recipe's runner, then write the run directory."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from finetune import distributed
from finetune.atomic import write_json, write_text
from finetune.cache import EmbeddingCache
from finetune.contract import RunOptions, Start
from finetune.data import load_data
from finetune.errors import FinetuneError
from finetune.extra_sets import extra_table
from finetune.kinds import KINDS
from finetune.memory.host import return_freed_memory
from finetune.model_card import write_model_card
from finetune.models import pick_device
from finetune.precision import precision_line
from finetune.recipe import Recipe, dump_recipe
from finetune.report import metrics_table, write_per_query
from finetune.rundir import claim_run_dir, prepare_run_dir, write_run_header
from finetune.significance import compare_rows
from finetune.significance import describe as describe_significance
from finetune.splits import Splits, make_splits
from finetune.stages import Stages, stage, stage_table
from finetune.timing import peak_rss_mb

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_recipe(
    recipe: Recipe,
    force_recache: bool = False,
    command: str = "",
    echo=print,
    run_dir: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    selection: bool = False,
    stop_behind=None,
    adopt: Path | None = None,
) -> Path:
    """Run ``recipe`` end to end and return its run directory.

    Everything that can fail on bad input is checked before anything is written, so a bad recipe
    leaves nothing behind. Under a launcher with several processes, every rank trains; rank 0 writes.

    Args:
        recipe: A validated recipe (see :func:`finetune.recipe.load_recipe`).
        force_recache: Recompute cached embeddings.
        command: The command line, recorded in the run directory.
        echo: Where the before/after table is printed.
        run_dir, overwrite: An exact folder for the run (default ``<output.dir>/<name>-<timestamp>``),
            and whether to replace it if it exists.
        resume: Continue a killed run: ``"latest"`` or its folder (kinds that are ``resumable``).
        selection: A sweep point: validation stands in for the test split (never scored); no export.
        stop_behind: A point of a kind that ``stops_behind``: the leader's curve (``qlora.behind.Leader``).
        adopt: A sweep's final run (kinds that ``reuses_training``): the chosen point, whose training is this run's.

    Returns:
        The run directory: ``recipe.yaml``, ``splits.json``, ``metrics.json``, ``versions.json`` and outputs.

    Example (not run: it needs a model, data or a server)::
        run_dir = run_recipe(load_recipe("recipes/adapter.yaml"))
        json.loads((run_dir / "metrics.json").read_text())["tuned"]["ndcg@10"]
    """
    seed_everything(recipe.seed)
    return_freed_memory()  # before the first large buffer: freed activations must not stay resident
    if resume is not None:
        KINDS[recipe.kind].refuse_resume()
    recipe_yaml = dump_recipe(recipe)
    path, resuming = prepare_run_dir(recipe.output.dir, recipe.name, recipe_yaml, run_dir, resume, overwrite)
    with Stages() as clock:
        data, splits = _data_and_splits(recipe, path, resuming, selection)
        device = pick_device(recipe.device)
        distributed.init(device)
        say = echo if distributed.is_main() else (lambda *_: None)
        options = RunOptions(export=not selection, stop_behind=stop_behind)
        with stage("set up"):
            job = _set_up(recipe, data, splits, device, force_recache, options, say)  # writes nothing

        run_dir = _claim(path, resuming, overwrite, recipe_yaml, splits, command, say)
        start = Start.resume() if resuming else Start.adopt(adopt) if adopt is not None else Start.fresh()
        result, outcome = _train_and_finish(job, run_dir, start, recipe, device, data, splits, selection)
    result["stages"] = clock.record()
    if distributed.is_main():
        _write_and_print(run_dir, recipe, result, outcome.per_query(), len(splits.test), selection, say)
    return run_dir


def _train_and_finish(job, run_dir: Path, start: Start, recipe: Recipe, device: str, data, splits, selection: bool):
    """The runner's train and finish phases, the paired test and the model card: ``metrics.json``'s fields and the
    outcome."""
    t0 = time.perf_counter()
    with stage("training"):
        job.train(run_dir, start)
    with stage("finish"):
        outcome = job.finish(run_dir)
    result = _result(recipe, device, data, splits, selection, outcome, time.perf_counter() - t0)
    per_query = outcome.per_query()
    if per_query and distributed.is_main():
        with stage("significance"):
            result["significance"] = compare_rows(per_query, seed=recipe.seed)
    if outcome.exported is not None and distributed.is_main():
        result["card"] = outcome.card  # what the kind says of its model: `export RUN --onnx` rewrites the card
        with stage("model card"):
            write_model_card(
                run_dir / "model", outcome.exported, recipe, result, splits.data_fingerprint, outcome.card
            )
    return result, outcome


def _data_and_splits(recipe: Recipe, path: Path, resuming: bool, selection: bool):
    """The recipe's data and its splits: a resumed run's own, else made with the recipe's seed."""
    with stage("load data"):
        data = load_data(recipe.data)
    with stage("splits"):
        splits = _resumed_splits(path, data) if resuming else make_splits(data, recipe.splits, recipe.seed)
    return data, splits.for_selection() if selection else splits


def _set_up(recipe: Recipe, data, splits: Splits, device: str, force_recache: bool, options: RunOptions, say):
    """The kind's runner, set up (models, embeddings, checks) before anything is written."""
    say(
        f"data: {data.source}: {len(data.queries)} queries, {len(data.corpus)} documents; splits {splits.counts()} "
        f"({splits.method})"
    )
    kind = KINDS[recipe.kind]
    cache = EmbeddingCache(recipe.cache.dir, recipe.cache.enabled, force_recache) if kind.caches_embeddings else None
    job = kind.runner_class()(recipe, data, splits, device, cache, echo=say, options=options)
    if cache is not None:
        say(f"device: {device}; embedding cache: {cache.hits} hit(s), {cache.misses} miss(es) in {cache.directory}")
    return job


def _result(recipe: Recipe, device: str, data, splits: Splits, selection: bool, outcome, seconds: float) -> dict:
    """``metrics.json``: the run's own fields around the outcome's."""
    result = {
        "recipe": recipe.name,
        "kind": recipe.kind,
        "device": device,
        "splits": splits.counts(),
        "scored_split": "val" if selection else "test",
        "n_corpus": len(data.corpus),
        **outcome.metrics(),
        "wall_seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    if distributed.world_size() > 1:
        result["world_size"] = distributed.world_size()
    return result


def _claim(path: Path, resuming: bool, overwrite: bool, recipe_yaml: str, splits, command: str, say) -> Path:
    """The run directory, claimed by rank 0 (shared with the others), with its header written or extended."""
    main = distributed.is_main()
    run_dir = distributed.share(claim_run_dir(path, resuming, overwrite) if main else None)
    if main and resuming:
        say(f"resuming {run_dir}")
        write_text(run_dir / "command.txt", (run_dir / "command.txt").read_text(encoding="utf-8") + command + "\n")
    elif main:
        write_run_header(run_dir, recipe_yaml, splits, command)
    return run_dir


def _write_and_print(run_dir: Path, recipe, result: dict, per_query, n_test: int, selection: bool, say) -> None:
    """``per_query.jsonl``, the paired test, ``metrics.json`` (last: without it a run is unfinished); the table."""
    if per_query:
        write_per_query(run_dir / "per_query.jsonl", per_query)
    write_json(run_dir / "metrics.json", result)
    scored = "validation split (a sweep point)" if selection else "test split"
    say(f"\n{recipe.name}: {scored}, {n_test} queries against {result['n_corpus']} documents")
    say(metrics_table({"base": result["base"], "tuned": result["tuned"]}))
    if result.get("also"):
        say(extra_table(result["also"]))
    if per_query:
        say(describe_significance(result["significance"], "validation" if selection else "test"))
    if result.get("precision"):
        say(precision_line(result["precision"]))
    if (run_dir / "summary.md").is_file():  # recipes that run several experiments tabulate them
        say("\n" + (run_dir / "summary.md").read_text(encoding="utf-8"))
    say("\n" + stage_table(result["stages"]))
    say(f"\nrun directory: {run_dir}")


def _resumed_splits(run_dir: Path, data) -> Splits:
    splits = Splits.load(run_dir / "splits.json")
    if splits.data_fingerprint and splits.data_fingerprint != data.fingerprint():
        raise FinetuneError(
            "the data changed since this run started (fingerprint differs); resume with the same data, or start a "
            "new run",
            where=str(run_dir / "splits.json"),
        )
    return splits
