"""Run any recipe: load data, make splits, prepare the recipe's runner, then write the run directory."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from finetune.atomic import write_json
from finetune.cache import EmbeddingCache
from finetune.data import load_data
from finetune.models import pick_device
from finetune.recipe import Recipe, dump_recipe
from finetune.report import metrics_table
from finetune.rundir import new_run_dir, write_run_header
from finetune.splits import make_splits
from finetune.timing import peak_rss_mb

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _runner_class(kind: str):
    if kind == "adapter":
        from finetune.adapter.runner import AdapterRun

        return AdapterRun
    if kind == "qlora":
        from finetune.qlora.runner import QLoRARun

        return QLoRARun
    if kind == "cross_adapter":
        from finetune.cross.runner import CrossAdapterRun

        return CrossAdapterRun
    raise ValueError(f"no runner for recipe kind {kind!r}")


def run_recipe(recipe: Recipe, force_recache: bool = False, command: str = "", echo=print) -> Path:
    """Run ``recipe`` end to end and return its run directory.

    Everything that can fail on bad input (data, splits, model, negatives) is loaded before the run
    directory is created, so a bad recipe leaves nothing behind.

    Args:
        recipe: A validated recipe (see :func:`finetune.recipe.load_recipe`).
        force_recache: Recompute cached embeddings.
        command: The command line, recorded in the run directory.
        echo: Where the before/after table is printed.

    Returns:
        The run directory, holding ``recipe.yaml``, ``splits.json``, ``metrics.json``, ``versions.json`` and outputs.

    Example:
        >>> run_dir = run_recipe(load_recipe("recipes/adapter.yaml"))
        >>> json.loads((run_dir / "metrics.json").read_text())["tuned"]["ndcg@10"]
    """
    seed_everything(recipe.seed)
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    device = pick_device(recipe.device)
    # only frozen-encoder recipes cache embeddings; a fine-tuned encoder changes them
    cache = EmbeddingCache(recipe.cache.dir, recipe.cache.enabled, force_recache) if hasattr(recipe, "cache") else None
    echo(f"data: {data.source}: {len(data.queries)} queries, {len(data.corpus)} documents; splits {splits.counts()} ({splits.method})")
    job = _runner_class(recipe.kind)(recipe, data, splits, device, cache)
    if cache is not None:
        echo(f"device: {device}; embedding cache: {cache.hits} hit(s), {cache.misses} miss(es) in {cache.directory}")

    run_dir = new_run_dir(recipe.output.dir, recipe.name)
    write_run_header(run_dir, dump_recipe(recipe), splits, command)
    t0 = time.perf_counter()
    result = job.fit(run_dir)
    result = {
        "recipe": recipe.name,
        "kind": recipe.kind,
        "device": device,
        "splits": splits.counts(),
        "n_corpus": len(data.corpus),
        **result,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(run_dir / "metrics.json", result)
    echo(f"\n{recipe.name}: test split, {len(splits.test)} queries against {len(data.corpus)} documents")
    echo(metrics_table({"base": result["base"], "tuned": result["tuned"]}))
    if (run_dir / "summary.md").is_file():  # recipes that run several experiments tabulate them
        echo("\n" + (run_dir / "summary.md").read_text(encoding="utf-8"))
    echo(f"\nrun directory: {run_dir}")
    return run_dir
