"""Command line: ``python -m finetune run|validate RECIPE [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from finetune.errors import FinetuneError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune embedding models for retrieval on your own documents.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe and write a run directory")
    validate = sub.add_parser("validate", help="check a recipe (and its data and splits) without training")
    for p in (run, validate):
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/adapter.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5 data=../shared/data/disfl_qa")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--force-recache", action="store_true", help="recompute cached embeddings")
    compare = sub.add_parser("compare", help="run (or read) several recipes on one splits file; write a table and a chart")
    compare.add_argument("entries", nargs="+", help="recipe YAMLs and/or finished run directories")
    compare.add_argument("--data", help="data for every recipe, e.g. ../shared/data/disfl_qa")
    compare.add_argument("--splits", help="a splits.json for every recipe (default: the first one found)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe (repeatable)")
    compare.add_argument("--out", default="runs/compare", help="where comparison.md/.json/.png go (default runs/compare)")
    compare.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    validate.add_argument("--no-data", action="store_true", help="check the recipe only, not its data")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m finetune`` and the ``finetune`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import about an optional hub-fetched CPU kernel; its built-in path is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not args.verbose:  # the evaluator logs every metric; the run prints its own table
        for name in ("sentence_transformers", "transformers", "httpx", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from finetune.recipe import load_recipe

        if args.command == "compare":
            return _compare(args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            return _validate(recipe, args)
        from finetune.qlora.backend import preload_unsloth

        preload_unsloth(recipe)  # before run imports transformers
        from finetune.run import run_recipe

        run_recipe(recipe, force_recache=args.force_recache, command="python -m finetune " + shlex.join(argv))
        return 0
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _compare(args) -> int:
    from pathlib import Path

    from finetune.qlora.backend import preload_unsloth
    from finetune.recipe import load_recipe

    for entry in args.entries:
        if Path(entry).is_file():
            preload_unsloth(load_recipe(entry, args.overrides))  # before anything imports transformers
    from finetune.compare import gather_runs, write_comparison

    runs = gather_runs(args.entries, data=args.data, splits_file=args.splits, overrides=args.overrides)
    print("\n" + write_comparison(runs, Path(args.out)))
    print(f"written: {args.out}/comparison.md, comparison.json, comparison.png")
    return 0


def _validate(recipe, args) -> int:
    print(f"{args.recipe}: recipe OK (kind {recipe.kind}, name {recipe.name})")
    if not args.no_data:
        from finetune.data import load_data
        from finetune.models import resolve_model
        from finetune.splits import make_splits

        data = load_data(recipe.data)
        splits = make_splits(data, recipe.splits, recipe.seed)
        print(f"data OK: {data.source}: {len(data.queries)} queries, {len(data.corpus)} documents; splits {splits.counts()}")
        for model in recipe.model_configs():
            resolved = resolve_model(model.name)
            print(f"model OK: {model.name} -> {resolved.path} ({resolved.source})")
    return 0
