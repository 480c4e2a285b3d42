"""Collect finished run directories into one result file under benchmarks/results/.

Reads each run's metrics.json, command.txt and versions.json as written by the run; nothing is
typed in by hand.

    python benchmarks/collect_runs.py runs/qlora-faq-* runs/full-faq-* --out benchmarks/results/qlora_cpu_faq.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from finetune.evaluation import HEADLINE
from finetune.qlora.behind import val_ndcg_key
from finetune.timing import seconds_per_step

KEYS = ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")


def label(run_dir: Path) -> str:
    """The run's folder name; a sweep's ``final`` run is named with its sweep (``faq-lr/final``)."""
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name == "final" else run_dir.name


def seconds(metrics: dict) -> dict | None:
    """The run's seconds, with per_step derived again by ``seconds_per_step`` from what the run
    wrote: older runs divided a resumed run's seconds by all its steps, not the steps it ran."""
    seconds, steps = metrics.get("seconds"), metrics.get("train_steps")
    if seconds and "per_step" in seconds and steps:
        seconds = {**seconds, "per_step": seconds_per_step(seconds["train"], steps, metrics.get("resumed_from_step"))}
    return seconds


def summarize(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "run": label(run_dir),
        "command": (run_dir / "command.txt").read_text().strip(),
        "kind": metrics["kind"],
        "backend": metrics.get("backend"),
        "splits": metrics["splits"],
        # "val" for a sweep point (or benchmarks/val_point.py): base and tuned are validation scores then
        "scored_split": metrics.get("scored_split", "test"),
        "base": {k: metrics["base"][k] for k in KEYS},
        "tuned": {k: metrics["tuned"][k] for k in KEYS},
        "significance": metrics.get("significance"),  # tuned - base, paired over the scored queries
        "table": {row: {k: metrics[row][k] for k in HEADLINE if k in metrics[row]} for row in ("base", "tuned")},
        "tuned_as_trained": {k: metrics["tuned_as_trained"][k] for k in KEYS}
        if "tuned_as_trained" in metrics
        else None,
        "trainable_parameters": metrics.get("trainable_parameters"),
        "also": {
            label: {which: {k: r[which][k] for k in KEYS} for which in ("base", "tuned")}
            for label, r in (metrics.get("also") or {}).items()
        },
        "merge": metrics.get("merge"),
        # the trainer's validation NDCG@10 by step: what a sweep would select on (the best of it)
        "val_ndcg@10_by_step": {
            h["step"]: h[key] for h in metrics.get("log_history") or [] if (key := val_ndcg_key(h)) is not None
        },
        "train_steps": metrics.get("train_steps"),
        "resumed_from_step": metrics.get("resumed_from_step"),
        "seconds": seconds(metrics),
        "wall_seconds": metrics.get("wall_seconds"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "stages": metrics.get("stages"),  # where the time went, with each stage's peak RSS; absent in older runs
        "peak_gpu_mb": metrics.get("peak_gpu_mb"),
        "gpu": metrics.get("gpu"),
        "precision": metrics.get("precision"),
        "optimizer": metrics.get("optimizer"),
        "batch_size": metrics.get("batch_size"),
        "step_time": metrics.get("step_time"),
        "loss": metrics.get("loss"),
        "matryoshka": metrics.get("matryoshka"),
        "memory_plan": metrics.get("memory_plan"),
        # the checkpoint's stack as trained and its checks (docs/checkpoint.md); absent in older runs
        "model": (metrics.get("model") or {}).get("stack"),
        "prompts": metrics.get("prompts"),
        "fidelity": metrics.get("fidelity"),
        "export": metrics.get("export") or metrics.get("export_max_abs_diff"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    unfinished = [r for r in args.runs if not (r / "metrics.json").is_file()]
    for r in unfinished:
        print(f"skipping {r}: no metrics.json (the run did not finish)")
    finished = [r for r in args.runs if r not in unfinished]
    if not finished:
        raise SystemExit("no finished runs to collect")
    runs = [summarize(r) for r in finished]
    versions = json.loads((finished[0] / "versions.json").read_text())
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count()},
        "versions": versions,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'run':<40}{'base':>8}{'tuned':>8}{'as-trained':>11}{'s/step':>8}{'step ms':>9}{'RSS MiB':>9}{'GPU MiB':>9}"
    )
    for r in runs:
        trained = r["tuned_as_trained"]["ndcg@10"] if r["tuned_as_trained"] else float("nan")
        step = (r["seconds"] or {}).get("per_step") or float("nan")  # None: no step trained
        median = (r["step_time"] or {}).get("median_s") or float("nan")
        print(
            f"{r['run']:<40}{r['base']['ndcg@10']:>8.4f}{r['tuned']['ndcg@10']:>8.4f}{trained:>11.4f}{step:>8.2f}"
            f"{1000 * median:>9.1f}{r['peak_rss_mb'] or 0:>9.0f}{r['peak_gpu_mb'] or 0:>9.0f}"
        )


if __name__ == "__main__":
    main()
