"""Tables and a chart of a cross-adapter run: ``summary.json``, ``summary.md`` and ``budget.png``.

Rows are flat dicts (experiment, test set, model or method, metrics, validation NDCG@10), so the
JSON holds everything; the Markdown tables pivot them: NDCG@10 against the label budget, averages
across domains, and one sentence saying which setting to use, chosen on validation.
"""

from __future__ import annotations

from pathlib import Path

from finetune.atomic import write_json, write_text
from finetune.report import save_line_chart

METRICS = ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")


def _order(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def budget_table(rows: list[dict]) -> str:
    """NDCG@10 on the fixed test split: one line per model/mode, one column per train ratio."""
    budget = [r for r in rows if r["group"] == "budget"]
    ratios = sorted({r["ratio"] for r in budget})
    cell = {(r["model"], r["ratio"]): r for r in budget}
    labelled = {r["ratio"]: r["labelled"] for r in budget}
    n_test = budget[0]["n_test"]
    lines = [
        f"Test NDCG@10 ({n_test} queries, identical for every cell); columns are the fraction of labelled train "
        "and val queries (their number), cells the labelled queries trained on in brackets; + or - where the paired "
        "95% interval of the difference to the small model alone excludes 0.",
        "",
        "| model / method | " + " | ".join(f"{r:g} ({labelled[r]})" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for model in _order(budget):
        cells = [cell.get((model, r)) for r in ratios]
        lines.append(f"| {model} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(row: dict | None) -> str:
    if row is None:
        return ""
    vs = row.get("vs_small")
    mark = "" if not vs or not vs["significant"] else " +" if vs["difference"] > 0 else " -"
    return f"{row['ndcg@10']:.4f}" + (f" ({row['train_queries']})" if row["train_queries"] else "") + mark


def domain_table(rows: list[dict], group: str) -> str:
    """Mean NDCG@10 across domains per model/mode and test set, and in how many domains a mode beats the small
    model.
    """
    mine = [r for r in rows if r["group"] == group]
    if not mine:
        return ""
    test_sets = list(dict.fromkeys(r["test_set"] for r in mine))
    domains = sorted({r["domain"] for r in mine})
    title = "Leave one domain out" if group == "lodo" else "One adapter per domain"
    lines = [
        f"{title}: {len(domains)} domains; mean NDCG@10 over domains (unweighted), and the domains where the row "
        "beats the small model alone.",
        "",
        "| model / mode | " + " | ".join(f"{t} mean | {t} wins" for t in test_sets) + " |",
        "|---|" + "---|---|" * len(test_sets),
    ]
    small = {(r["domain"], r["test_set"]): r["ndcg@10"] for r in mine if r["model"] == "small model alone"}
    for model in _order(mine):
        cells = []
        for t in test_sets:
            scores = {r["domain"]: r["ndcg@10"] for r in mine if r["model"] == model and r["test_set"] == t}
            wins = sum(scores[d] > small[(d, t)] + 1e-9 for d in scores)
            cells.append(
                f"{sum(scores.values()) / len(scores):.4f} | "
                f"{'' if model == 'small model alone' else f'{wins}/{len(scores)}'}"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recommendation(rows: list[dict]) -> str:
    """Which row to use at the largest label budget, by validation NDCG@10 (the test split only reports it)."""
    budget = [r for r in rows if r["group"] == "budget" and r["test_set"] == "test"]
    top = max(r["ratio"] for r in budget)
    at_top = [r for r in budget if r["ratio"] == top]
    by_name = {r["model"]: r for r in at_top}
    candidates = [r for r in at_top if r.get("val_ndcg@10") is not None]
    if not candidates:
        return "No validation queries, so no setting is recommended; set splits.val_fraction above 0."
    best = max(candidates, key=lambda r: r["val_ndcg@10"])
    small, large = by_name["small model alone"]["ndcg@10"], by_name["large model alone"]["ndcg@10"]
    what = "Keep the small model alone" if best["model"] == "small model alone" else f"Use {best['model']}"
    return (
        f"{what}: the best validation NDCG@10 ({best['val_ndcg@10']:.4f}) with {best['labelled']} labelled queries; "
        f"on test it scores {best['ndcg@10']:.4f}, the small model alone {small:.4f} and the large model alone "
        f"{large:.4f}."
    )


def plot_budget(rows: list[dict], path: Path, title: str) -> None:
    """NDCG@10 against the number of labelled queries, one line per method, zero-shot models as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = [r for r in rows if r["group"] == "budget"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in _order(budget):
        points = sorted((r["labelled"], r["ndcg@10"]) for r in budget if r["model"] == model)
        if model.endswith("alone") or "," in model:
            ax.axhline(
                points[0][1],
                linestyle="--",
                linewidth=1,
                color="gray" if "small" in model else "black",
                label=f"{model} ({points[0][1]:.3f})",
            )
        else:
            ax.plot(*zip(*points), marker="o", label=model)
    save_line_chart(fig, ax, path, "labelled queries (train + val)", "test NDCG@10", title)


def write_summary(run_dir: Path, rows: list[dict], info: dict) -> str:
    """Write ``summary.json``, ``summary.md`` and ``budget.png`` into ``run_dir``; return the Markdown."""
    text = budget_table(rows)
    for group in ("lodo", "per_domain"):
        table = domain_table(rows, group)
        text += ("\n" + table) if table else ""
    text += "\n" + recommendation(rows) + "\n"
    write_json(run_dir / "summary.json", {**info, "rows": rows})
    write_text(run_dir / "summary.md", text)
    short = {k: str(info[k]).rstrip("/").split("/")[-1] for k in ("query_model", "document_model")}
    plot_budget(rows, run_dir / "budget.png", f"{short['query_model']} queries → {short['document_model']} documents")
    return text
