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
from finetune.data import load_data
from finetune.errors import FinetuneError
from finetune.extra_sets import extra_table
from finetune.kinds import KINDS
from finetune.models import pick_device
from finetune.recipe import Recipe, dump_recipe
from finetune.report import metrics_table, write_per_query
from finetune.rundir import claim_run_dir, prepare_run_dir, write_run_header
from finetune.significance import compare_rows
from finetune.significance import describe as describe_significance
from finetune.splits import Splits, make_splits
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
    trained_in: Path | None = None,
) -> Path:
    """Run ``recipe`` end to end and return its run directory.

    Everything that can fail on bad input (data, splits, model, negatives, the run directory) is
    checked before anything is written, so a bad recipe leaves nothing behind. Under a launcher
    with several processes, every rank trains and only rank 0 writes.

    Args:
        recipe: A validated recipe (see :func:`finetune.recipe.load_recipe`).
        force_recache: Recompute cached embeddings.
        command: The command line, recorded in the run directory.
        echo: Where the before/after table is printed.
        run_dir: An exact folder for the run (default ``<output.dir>/<name>-<timestamp>``).
        resume: Continue a killed run: ``"latest"`` or its folder (adapter and qlora recipes).
        overwrite: Replace ``run_dir`` if it exists.
        selection: A sweep point (:mod:`finetune.sweep`): the validation queries stand in for the test
            split, which is never scored, and nothing is exported.
        stop_behind: A sweep point of a qlora recipe: stop training when its validation curve is clearly
            behind this :class:`~finetune.qlora.behind.Leader`.
        trained_in: A qlora sweep's final run: the chosen point's run directory. Its training is this
            run's (same recipe, splits and seed), so its checkpoints and end weights are taken over and no step
            is trained.

    Returns:
        The run directory, holding ``recipe.yaml``, ``splits.json``, ``metrics.json``, ``versions.json`` and outputs.

    Example (not run: it needs a model, data or a server)::
        run_dir = run_recipe(load_recipe("recipes/adapter.yaml"))
        json.loads((run_dir / "metrics.json").read_text())["tuned"]["ndcg@10"]
    """
    seed_everything(recipe.seed)
    kind = KINDS[recipe.kind]
    if resume is not None:
        kind.refuse_resume()
    recipe_yaml = dump_recipe(recipe)
    path, resuming = prepare_run_dir(recipe.output.dir, recipe.name, recipe_yaml, run_dir, resume, overwrite)
    data = load_data(recipe.data)
    splits = _resumed_splits(path, data) if resuming else make_splits(data, recipe.splits, recipe.seed)
    if selection:
        splits = splits.for_selection()
    device = pick_device(recipe.device)
    distributed.init(device)
    main = distributed.is_main()
    say = echo if main else (lambda *_: None)
    cache = EmbeddingCache(recipe.cache.dir, recipe.cache.enabled, force_recache) if kind.caches_embeddings else None
    say(
        f"data: {data.source}: {len(data.queries)} queries, {len(data.corpus)} documents; splits {splits.counts()} "
        f"({splits.method})"
    )
    job = kind.runner_class()(recipe, data, splits, device, cache, echo=say)  # checks everything; writes nothing
    job.export = not selection
    if stop_behind is not None:
        job.stop_behind = stop_behind
    if trained_in is not None:
        job.trained_in = trained_in
    if cache is not None:
        say(f"device: {device}; embedding cache: {cache.hits} hit(s), {cache.misses} miss(es) in {cache.directory}")

    run_dir = distributed.share(claim_run_dir(path, resuming, overwrite) if main else None)
    if main and resuming:
        say(f"resuming {run_dir}")
        write_text(run_dir / "command.txt", (run_dir / "command.txt").read_text(encoding="utf-8") + command + "\n")
    elif main:
        write_run_header(run_dir, recipe_yaml, splits, command)
    t0 = time.perf_counter()
    result = job.fit(run_dir, resume=resuming)
    per_query = result.pop("per_query", None)
    result = {
        "recipe": recipe.name,
        "kind": recipe.kind,
        "device": device,
        "splits": splits.counts(),
        "scored_split": "val" if selection else "test",
        "n_corpus": len(data.corpus),
        **result,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    if distributed.world_size() > 1:
        result["world_size"] = distributed.world_size()
    if not main:
        return run_dir
    if per_query:
        write_per_query(run_dir / "per_query.jsonl", per_query)
        result["significance"] = compare_rows(per_query, seed=recipe.seed)
    write_json(run_dir / "metrics.json", result)  # written last: a run directory without it is unfinished
    scored = "validation split (a sweep point)" if selection else "test split"
    say(f"\n{recipe.name}: {scored}, {len(splits.test)} queries against {len(data.corpus)} documents")
    say(metrics_table({"base": result["base"], "tuned": result["tuned"]}))
    if result.get("also"):
        say(extra_table(result["also"]))
    if per_query:
        say(describe_significance(result["significance"], "validation" if selection else "test"))
    if (run_dir / "summary.md").is_file():  # recipes that run several experiments tabulate them
        say("\n" + (run_dir / "summary.md").read_text(encoding="utf-8"))
    say(f"\nrun directory: {run_dir}")
    return run_dir


def _resumed_splits(run_dir: Path, data) -> Splits:
    splits = Splits.load(run_dir / "splits.json")
    if splits.data_fingerprint and splits.data_fingerprint != data.fingerprint():
        raise FinetuneError(
            "the data changed since this run started (fingerprint differs); resume with the same data, or start a "
            "new run",
            where=str(run_dir / "splits.json"),
        )
    return splits
