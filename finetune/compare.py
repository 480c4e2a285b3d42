"""Compare recipes on one shared ``splits.json``: a Markdown table, a JSON file and a PNG chart.

Each entry is a recipe YAML (run now, or reused when a finished run of the identical resolved
recipe exists) or a finished run directory (read as it is). The first splits file found (from
``--splits``, a run directory, or the first recipe run) is handed to every later recipe, and the
test queries of all runs are checked to be identical before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.atomic import atomic_path, write_json, write_text
from finetune.errors import FinetuneError
from finetune.recipe import load_recipe
from finetune.report import read_per_query
from finetune.significance import mean_interval, paired_metric

METRICS = ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")


def find_finished_run(recipe, splits_file: str | None = None) -> Path | None:
    """The newest finished run directory of ``recipe``: same resolved recipe and, when
    ``splits_file`` is given, the same train/val/test query ids (wherever that file lives)."""
    import yaml

    def comparable(raw: dict) -> dict:  # the splits file's path is not the splits: compare ids instead
        return {**raw, "splits": {k: v for k, v in raw.get("splits", {}).items() if k != "file"}}

    wanted = comparable(recipe.model_dump(mode="json"))  # compared as data, so key order does not matter
    ids = _split_ids(Path(splits_file)) if splits_file else None
    for run_dir in sorted(Path(recipe.output.dir).glob(f"{recipe.name}-*"), reverse=True):
        if not all((run_dir / f).is_file() for f in ("metrics.json", "recipe.yaml", "splits.json")):
            continue
        if comparable(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))) != wanted:
            continue
        if ids is None or _split_ids(run_dir / "splits.json") == ids:
            return run_dir
    return None


def _split_ids(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return {k: raw.get(k) for k in ("train", "val", "test")}


def _check_run_dir(path: Path) -> Path:
    if (path / "sweep.json").is_file():  # a sweep directory stands for its chosen point's final run
        path = path / json.loads((path / "sweep.json").read_text())["final_run"]
    for name in ("metrics.json", "splits.json"):
        if not (path / name).is_file():
            raise FinetuneError(
                f"not a finished run directory (no {name}); pass a recipe YAML or a run directory", where=str(path)
            )
    return path


def gather_runs(
    entries: list[str], data: str | None = None, splits_file: str | None = None, overrides: list[str] = (), echo=print
) -> list[Path]:
    """Run or reuse each entry on one shared splits file and return the run directories, in order.

    Args:
        entries: Recipe YAML files and/or finished run directories.
        data: Optional ``data=`` override applied to every recipe.
        splits_file: A ``splits.json`` to use for every recipe; else the first one found.
        overrides: ``key=value`` overrides applied to every recipe.
        echo: Where progress lines go.
    """
    from finetune.run import run_recipe

    shared = splits_file
    for entry in entries:  # an existing run fixes the splits for the recipes that follow
        if Path(entry).is_dir() and shared is None:
            shared = str(_check_run_dir(Path(entry)) / "splits.json")
    runs = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            runs.append(_check_run_dir(path))
            continue
        extra = list(overrides) + ([f"data={data}"] if data else []) + ([f"splits.file={shared}"] if shared else [])
        recipe = load_recipe(entry, extra)
        run_dir = find_finished_run(recipe, shared)
        if run_dir is not None:
            echo(f"{entry}: reusing {run_dir}")
        else:
            echo(f"{entry}: running {recipe.name}")
            run_dir = run_recipe(
                recipe, command="python -m finetune run " + " ".join([entry, *extra]), echo=lambda *_: None
            )
        shared = shared or str(run_dir / "splits.json")
        runs.append(run_dir)
    _check_same_test_queries(runs)
    return runs


def _check_same_test_queries(runs: list[Path]) -> None:
    first = json.loads((runs[0] / "splits.json").read_text())["test"]
    for run_dir in runs[1:]:
        if json.loads((run_dir / "splits.json").read_text())["test"] != first:
            raise FinetuneError(
                f"its test queries differ from {runs[0]}'s; rerun it with splits.file={runs[0] / 'splits.json'}",
                where=str(run_dir),
            )


def _label(metrics: dict) -> str:
    """The recipe's name, with how the encoder trained when the run trained one (its ``backend`` record)."""
    if "backend" in metrics:
        backend = metrics["backend"]
        quant = "nf4" if "quantization nf4" in backend else "16-bit" if metrics.get("method") == "lora" else ""
        return f"{metrics['recipe']} ({metrics.get('method', 'lora')}{', ' + quant if quant else ''})"
    return metrics["recipe"]


def _per_query(run_dir: Path) -> dict | None:
    """The run's ``per_query.jsonl`` (older runs have none), checked against its own test queries."""
    path = run_dir / "per_query.jsonl"
    if not path.is_file():
        return None
    test = set(json.loads((run_dir / "splits.json").read_text())["test"])
    try:
        scores = read_per_query(path)
    except (ValueError, KeyError):
        raise FinetuneError("not a per-query file of this toolkit (unreadable rows)", where=str(path)) from None
    for model in ("base", "tuned"):
        if set(scores.get(model, {})) != test:
            raise FinetuneError(
                f"its {model} rows are not the run's test queries (splits.json); was it edited or copied from another "
                "run? Delete it to compare without intervals",
                where=str(path),
            )
    return scores


def _interval(scores: dict | None, model: str) -> dict:
    """95% intervals of a row's mean per metric, from its per-query scores (empty without them)."""
    if scores is None:
        return {}
    return {k: mean_interval([v[k] for v in scores[model].values()]) for k in METRICS}


def comparison_rows(runs: list[Path], per_query: dict[str, dict | None] | None = None) -> list[dict]:
    """One row per distinct base model, then one per run: metrics and costs from each ``metrics.json``.

    Runs with per-query scores also get 95% intervals (``ci``) and the paired difference of
    NDCG@10 to their own base (``vs_base``).

    Args:
        runs: Finished run directories.
        per_query: Run directory (as a string) -> its checked per-query scores; read here when not given.
    """
    per_query = per_query if per_query is not None else {str(r): _per_query(r) for r in runs}
    rows, bases = [], {}
    for run_dir in runs:
        m = json.loads((run_dir / "metrics.json").read_text())
        scores = per_query[str(run_dir)]
        model = _recipe_model(run_dir)
        base_key = (model, tuple(round(m["base"][k], 6) for k in METRICS))
        if base_key not in bases:
            bases[base_key] = {
                "name": f"base ({model})",
                "run": None,
                **{k: m["base"][k] for k in METRICS},
                "ci": _interval(scores, "base"),
                "also": _also(m, "base"),
            }
        seconds = m.get("seconds", {})
        rows.append(
            {
                "name": _label(m),
                "run": str(run_dir),
                **{k: m["tuned"][k] for k in METRICS},
                "ci": _interval(scores, "tuned"),
                "also": _also(m, "tuned"),
                "vs_base": None if scores is None else paired_metric(scores["base"], scores["tuned"]),
                "train_seconds": seconds.get("train"),
                "encode_seconds": seconds.get("encode"),
                "peak_rss_mb": m.get("peak_rss_mb"),
                "peak_gpu_mb": m.get("peak_gpu_mb"),
                "trainable_parameters": m.get("trainable_parameters"),
                "document_embeddings_recomputed": m.get("document_embeddings_recomputed"),
                "device": m.get("device"),
            }
        )
    return list(bases.values()) + rows


def _also(metrics: dict, which: str) -> dict[str, float]:
    """NDCG@10 on each ``eval.also`` set (test split of that set), base or tuned."""
    return {label: r[which]["ndcg@10"] for label, r in (metrics.get("also") or {}).items()}


def _recipe_model(run_dir: Path) -> str:
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    # the base row's model: a reranker's base is its retriever, a cross-adapter's its document model
    for section in ("retriever", "document_model", "model"):
        if (recipe.get(section) or {}).get("name"):
            return recipe[section]["name"]
    return "?"


def markdown_table(rows: list[dict], n_test: int, n_corpus: int) -> str:
    """The comparison as a Markdown table (costs are blank for base rows)."""

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    def memory(r):
        parts = [
            f"{r['peak_rss_mb'] / 1024:.1f} GiB RSS" if r.get("peak_rss_mb") else "",
            f"{r['peak_gpu_mb']:.0f} MiB GPU" if r.get("peak_gpu_mb") else "",
        ]
        return ", ".join(p for p in parts if p)

    extra = list(dict.fromkeys(label for r in rows for label in r.get("also", {})))
    lines = [
        f"Test split: {n_test} queries against {n_corpus} documents, identical for every row.",
        "",
        "| model | NDCG@10 | MRR@10 | accuracy@1 | recall@10 | Δ NDCG@10 vs base [95% CI] | train time "
        "| peak memory | trainable params | documents re-embedded |"
        + "".join(f" NDCG@10 {x} (eval.also) |" for x in extra),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for r in rows:
        recomputed = r.get("document_embeddings_recomputed")
        lines.append(
            f"| {r['name']} | "
            + " | ".join(f"{r[k]:.4f}" for k in METRICS)
            + f" | {_versus(r.get('vs_base'))}"
            + f" | {_train_time(r)}"
            + f" | {memory(r)} | {num(r.get('trainable_parameters'), ',')}"
            + f" | {'' if recomputed is None else 'yes' if recomputed else 'no'} |"
            + "".join(f" {num(r.get('also', {}).get(x), '.4f')} |" for x in extra)
        )
    lines.append("")
    lines.append(
        "Δ: paired over the test queries, 95% bootstrap interval, sign-flip p; * where the interval excludes 0."
    )
    return "\n".join(lines) + "\n"


def _versus(d: dict | None) -> str:
    if d is None:
        return ""
    mark = " *" if d["significant"] else ""
    p = "p < 0.001" if d["p_value"] < 0.001 else f"p {d['p_value']:.3f}"
    return f"{d['difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] {p}{mark}"


def best_two(rows: list[dict], per_query: dict[str, dict | None]) -> dict | None:
    """The paired NDCG@10 difference of the two best trained rows (by NDCG@10), when both have per-query scores."""
    trained = sorted((r for r in rows if r["run"] and r.get("vs_base")), key=lambda r: -r["ndcg@10"])
    if len(trained) < 2:
        return None
    first, second = trained[:2]
    difference = paired_metric(per_query[second["run"]]["tuned"], per_query[first["run"]]["tuned"])
    return {"better": first["name"], "other": second["name"], **difference}


def _train_time(row: dict) -> str:
    if row.get("train_seconds") is None:
        return ""
    text = f"{row['train_seconds']:.1f} s"
    if row.get("encode_seconds") is not None:  # frozen-encoder recipes pay for embedding once, then train on the cache
        text += (
            f" (+{row['encode_seconds']:.1f} s embedding)"
            if row["encode_seconds"] >= 0.05
            else " (embeddings from cache)"
        )
    return text


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: one group per metric, one bar per row; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(METRICS), 4.2 + 0.25 * len(rows)))
    width = 0.8 / len(rows)
    x = np.arange(len(METRICS))
    for i, r in enumerate(rows):
        ci = r.get("ci") or {}
        yerr = (
            [[r[k] - ci[k][0] for k in METRICS], [ci[k][1] - r[k] for k in METRICS]] if ci else None
        )  # the row's 95% bootstrap interval over test queries
        offset = (i - (len(rows) - 1) / 2) * width
        bars = ax.bar(x + offset, [r[k] for k in METRICS], width, yerr=yerr, capsize=2, label=r["name"])
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, METRICS)
    ax.set_ylim(0, 1.08)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)


def write_comparison(runs: list[Path], out_dir: Path) -> str:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png`` to ``out_dir``; return the table."""
    per_query = {str(r): _per_query(r) for r in runs}  # each file read and checked once
    rows = comparison_rows(runs, per_query)
    first = json.loads((runs[0] / "metrics.json").read_text())
    n_test, n_corpus = first["splits"]["test"], first.get("n_corpus")
    table = markdown_table(rows, n_test, n_corpus)
    top = best_two(rows, per_query)
    if top:
        table += (
            f"\nBest two: {top['better']} - {top['other']}: NDCG@10 {_versus(top)} "
            f"({'the interval excludes 0' if top['significant'] else 'not distinguishable at 95%'}).\n"
        )
    out_dir = Path(out_dir)
    write_text(out_dir / "comparison.md", table)
    write_json(
        out_dir / "comparison.json",
        {
            "splits": str(runs[0] / "splits.json"),
            "n_test": n_test,
            "n_corpus": n_corpus,
            "rows": rows,
            "best_two": top,
        },
    )
    plot(rows, out_dir / "comparison.png", f"test split: {n_test} queries, {n_corpus} documents")
    return table
