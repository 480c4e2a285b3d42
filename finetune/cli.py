"""Command line: ``python -m finetune run|validate|plan RECIPE [key.sub=value ...]``, compare, sweep, synth."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from finetune.errors import FinetuneError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="Fine-tune embedding models for retrieval on your own documents."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe and write a run directory")
    validate = sub.add_parser("validate", help="check a recipe (and its data and splits) without training")
    for p in (run, validate):
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/adapter.yaml")
        p.add_argument(
            "overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5 data=../shared/data/disfl_qa"
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.add_argument("--force-recache", action="store_true", help="recompute cached embeddings")
    run.add_argument("--run-dir", help="write the run here instead of <output.dir>/<name>-<timestamp>")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue a killed run from its last checkpoint (default: the newest unfinished run of this recipe)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace --run-dir if it exists")
    validate.add_argument("--no-data", action="store_true", help="check the recipe only, not its data")
    export = sub.add_parser("export", help="add files to a finished run's model/: --onnx (fp32 and int8, checked)")
    export.add_argument("run_dir", help="a finished run directory, e.g. runs/qlora-faq-...")
    export.add_argument("--onnx", action="store_true", help="write model/onnx/ and record its checks")
    export.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _compare_parser(sub)
    _plan_and_sweep_parsers(sub)
    _synth_parsers(sub)
    return parser


def _compare_parser(sub) -> None:
    compare = sub.add_parser(
        "compare", help="run (or read) several recipes on one splits file; write a table and a chart"
    )
    compare.add_argument("entries", nargs="+", help="recipe YAMLs and/or finished run directories")
    compare.add_argument("--data", help="data for every recipe, e.g. ../shared/data/disfl_qa")
    compare.add_argument("--splits", help="a splits.json for every recipe (default: the first one found)")
    compare.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every recipe (repeatable)",
    )
    compare.add_argument(
        "--out", default="runs/compare", help="where comparison.md/.json/.png go (default runs/compare)"
    )
    compare.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _plan_and_sweep_parsers(sub) -> None:
    plan = sub.add_parser(
        "plan", help="predict a qlora recipe's peak GPU memory (nf4 LoRA, 16-bit LoRA, full); no GPU, no weights"
    )
    plan.add_argument("recipe", help="a qlora recipe YAML, e.g. recipes/qlora.yaml")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.batch_size=128")
    plan.add_argument("--gpu-memory", help="e.g. 16GiB: also print the largest batch (or mini-batch) that fits")
    plan.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sweep = sub.add_parser(
        "sweep", help="run a grid of settings, choose on validation, score the chosen point's test split once"
    )
    sweep.add_argument("recipe", help="recipe YAML (adapter or qlora), e.g. recipes/adapter.yaml")
    sweep.add_argument("grid", nargs="*", help="key=v1,v2,... (swept) and key=value (fixed), e.g. train.lr=1e-3,3e-3")
    sweep.add_argument("--budget", type=int, help="run N random points of the grid (seeded by the recipe's seed)")
    sweep.add_argument("--dir", help="the sweep directory; an unfinished one with the same command resumes")
    sweep.add_argument(
        "--stop-behind",
        type=float,
        metavar="MARGIN",
        help="qlora: stop a point whose validation NDCG@10 trails the best finished point's by more than MARGIN at "
        "the same epoch, twice in a row (default 0.02; 0: train every point to the end)",
    )
    sweep.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _synth_parsers(sub) -> None:
    import os

    synth = sub.add_parser(
        "synth", help="write (question, chunk) training pairs with an LLM behind an OpenAI-compatible endpoint"
    )
    synth.add_argument(
        "--chunks", required=True, help="chunks .jsonl ({text, id}), or a .txt/.md file or folder to chunk"
    )
    synth.add_argument("--out", required=True, help="pairs .jsonl to write; the recipes read it with data=<out>")
    synth.add_argument("--per-chunk", type=int, default=10, help="questions to ask for per chunk (default 10)")
    synth.add_argument(
        "--model",
        default=os.environ.get("FINETUNE_SYNTH_MODEL", "gpt-4o-mini"),
        help="chat model name (default $FINETUNE_SYNTH_MODEL or gpt-4o-mini)",
    )
    synth.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1 for Ollama "
        "(default $OPENAI_BASE_URL or OpenAI)",
    )
    synth.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the key (default OPENAI_API_KEY; unset = no key)",
    )
    synth.add_argument("--prompt", help="prompt template file with {chunk} and {n} (default: the packaged one)")
    synth.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    synth.add_argument("--temperature", type=float, default=0.7)
    synth.add_argument(
        "--max-retries", type=int, default=5, help="retries per request on 429/5xx/timeouts (default 5)"
    )
    synth.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    synth.add_argument("--limit", type=int, help="only the first N chunks (a trial run)")
    chunk = sub.add_parser("chunk", help="split .txt/.md files into a chunks .jsonl")
    chunk.add_argument("docs", help="a .txt/.md file or a folder of them")
    chunk.add_argument("--out", required=True, help="chunks .jsonl to write")
    for p in (synth, chunk):
        p.add_argument(
            "--chunk-size", type=int, default=1500, help="characters per chunk when chunking text (default 1500)"
        )
        p.add_argument(
            "--chunk-overlap",
            type=int,
            default=200,
            help="characters repeated between neighbouring chunks (default 200)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m finetune`` and the ``finetune`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow an option (run R --resume DIR train.lr=0.1); anything else is an error
    if extra and (
        args.command not in ("run", "validate", "plan") or not all("=" in e and not e.startswith("-") for e in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _configure_logging(args.verbose)
    try:
        return _dispatch(args, "python -m finetune " + shlex.join(argv))
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import about an optional hub-fetched CPU kernel; its built-in path is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not verbose:  # the evaluator logs every metric; the run prints its own table
        for name in ("sentence_transformers", "transformers", "httpx", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _dispatch(args, command: str) -> int:
    from finetune.kinds import KINDS
    from finetune.recipe import load_recipe

    if args.command == "compare":
        return _compare(args)
    if args.command in ("synth", "chunk"):
        return _synth(args)
    if args.command == "export":
        if not args.onnx:
            raise FinetuneError("say what to add: --onnx", where="export")
        from finetune.export_command import export_run_onnx

        export_run_onnx(Path(args.run_dir))
        return 0
    if args.command == "sweep":
        from finetune.sweep import run_sweep

        run_sweep(
            args.recipe,
            args.grid,
            args.budget,
            args.dir,
            command=command,
            stop_behind=args.stop_behind,
        )
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        return _validate(recipe, args)
    if args.command == "plan":
        return _plan(recipe, args)
    KINDS[recipe.kind].preload(recipe)  # before run imports transformers
    from finetune.run import run_recipe

    run_recipe(
        recipe,
        force_recache=args.force_recache,
        command=command,
        run_dir=args.run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return 0


def _plan(recipe, args) -> int:
    from finetune.kinds import KINDS

    print(KINDS[recipe.kind].memory_plan(recipe, args.gpu_memory, where=args.recipe))
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from finetune.kinds import KINDS
    from finetune.recipe import load_recipe

    for entry in args.entries:
        if Path(entry).is_file():
            recipe = load_recipe(entry, args.overrides)
            KINDS[recipe.kind].preload(recipe)  # before anything imports transformers
    from finetune.compare import gather_runs, write_comparison

    runs = gather_runs(args.entries, data=args.data, splits_file=args.splits, overrides=args.overrides)
    print("\n" + write_comparison(runs, Path(args.out)))
    print(f"written: {args.out}/comparison.md, comparison.json, comparison.png")
    return 0


def _synth(args) -> int:
    import json

    from finetune.atomic import write_text
    from finetune.synth.chunking import load_chunks
    from finetune.synth.generate import SynthSettings, describe, synthesize

    if not 0 <= args.chunk_overlap < args.chunk_size:
        raise FinetuneError(
            f"need 0 <= --chunk-overlap < --chunk-size, got {args.chunk_overlap} and {args.chunk_size}",
            where="command line",
        )
    source = args.docs if args.command == "chunk" else args.chunks
    chunks = load_chunks(source, args.chunk_size, args.chunk_overlap)
    if args.command == "chunk":
        write_text(
            args.out,
            "".join(
                json.dumps({"id": c.id, "text": c.text, "source": c.source}, ensure_ascii=False) + "\n" for c in chunks
            ),
        )
        print(f"{len(chunks)} chunks written to {args.out}")
        return 0
    if args.per_chunk < 1 or args.concurrency < 1:
        raise FinetuneError("--per-chunk and --concurrency must be at least 1", where="command line")
    chunks = chunks[: args.limit] if args.limit else chunks
    settings = SynthSettings(
        model=args.model,
        base_url=args.base_url,
        per_chunk=args.per_chunk,
        temperature=args.temperature,
        prompt=args.prompt,
        api_key_env=args.api_key_env or None,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
    )
    report = synthesize(chunks, args.out, settings)
    print(describe(report))
    print(f"pairs: {args.out}; train on them with: python -m finetune run recipes/adapter.yaml data={args.out}")
    if report.failed:
        first = next(iter(report.failed.values()))
        print(
            f"error: {len(report.failed)} chunk(s) failed (first: {first}); run the same command again to retry only "
            "those",
            file=sys.stderr,
        )
        return 1
    return 0


def _validate(recipe, args) -> int:
    print(f"{args.recipe}: recipe OK (kind {recipe.kind}, name {recipe.name})")
    if not args.no_data:
        from finetune.data import load_data
        from finetune.models import resolve_model
        from finetune.splits import make_splits

        data = load_data(recipe.data)
        splits = make_splits(data, recipe.splits, recipe.seed)
        print(
            f"data OK: {data.source}: {len(data.queries)} queries, {len(data.corpus)} documents; splits "
            f"{splits.counts()}"
        )
        for field, model in recipe.model_configs().items():
            if model.provider != "local":
                print(f"model: {model.name} at {model.base_url} ({model.provider}; not contacted by validate)")
                continue
            resolved = resolve_model(model.name, field=field)
            print(f"model OK: {model.name} -> {resolved.path} ({resolved.source})")
    return 0
