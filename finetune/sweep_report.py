"""What a sweep writes: ``sweep.json`` (every point's validation score, the choice, its test score),
``sweep.md`` (the same as a table) and ``sweep.png`` (validation NDCG@10 per point, the choice marked)."""

from __future__ import annotations

from pathlib import Path

from finetune.atomic import write_json, write_text


def write_report(out: Path, plan: dict, rows: list[dict], best: dict, final: dict, echo=print) -> None:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out`` and print the table.

    Args:
        out: The sweep directory.
        plan: What was asked (recipe, arguments, budget, points).
        rows: One per point: ``point``, ``settings``, ``val_ndcg@10``, ``base_val_ndcg@10``, ``seconds``, ``run``,
            ``stopped_behind`` (where a qlora point stopped behind the leader, or None),
            ``resumed_from_step`` (a qlora point cut off and continued from that checkpoint, or None).
        best: The chosen row.
        final: The chosen point's final run's ``metrics.json`` (the only test scores of the sweep).
    """
    test = {"base": final["base"]["ndcg@10"], "tuned": final["tuned"]["ndcg@10"]}
    summary = {
        **plan,
        "chosen": {"point": best["point"], "settings": best["settings"], "val_ndcg@10": best["val_ndcg@10"]},
        "test_ndcg@10": test,
        "test_split": final["splits"]["test"],
        "final_run": "final",
        "points": rows,
        "seconds": sum(r["seconds"] for r in rows),
    }
    write_json(out / "sweep.json", summary)
    table = markdown(rows, best, test, final["splits"])
    write_text(out / "sweep.md", table + "\n")
    plot(rows, best, out / "sweep.png")
    echo("\n" + table)
    echo(f"\nsweep directory: {out} (compare reads it as its final run)")


def markdown(rows: list[dict], best: dict, test: dict, counts: dict) -> str:
    """The points sorted by validation NDCG@10, the chosen one marked, and the test line of the choice."""
    keys = list(rows[0]["settings"])
    lines = [
        f"| {' | '.join(keys)} | val NDCG@10 | seconds |",
        f"|{'---|' * (len(keys) + 2)}",
    ]
    for r in sorted(rows, key=lambda r: -r["val_ndcg@10"]):
        mark = " **chosen**" if r is best else ""
        if r.get("stopped_behind"):  # older sweeps have no such key
            mark = f" (stopped at epoch {r['stopped_behind']['epoch']:.2f}, behind)"
        if r.get("resumed_from_step"):
            mark += f" (resumed from step {r['resumed_from_step']}: seconds since then)"
        values = " | ".join(r["settings"][k] for k in keys)
        lines.append(f"| {values} | {r['val_ndcg@10']:.4f}{mark} | {r['seconds']:.1f} |")
    lines += [
        "",
        f"Base model, validation NDCG@10: {rows[0]['base_val_ndcg@10']:.4f} ({counts['val']} queries).",
        f"Chosen point on the test split ({counts['test']} queries, scored once): "
        f"base {test['base']:.4f} -> tuned {test['tuned']:.4f} ({test['tuned'] - test['base']:+.4f}).",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], best: dict, path: Path) -> None:
    """Validation NDCG@10 per point (grid order), the base model as a line, the choice in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finetune.report import save_line_chart

    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(rows)), 4.2))
    xs = [r["point"] for r in rows]
    ax.bar(xs, [r["val_ndcg@10"] for r in rows], color=["tab:red" if r is best else "tab:blue" for r in rows])
    ax.axhline(rows[0]["base_val_ndcg@10"], color="grey", linestyle="--", label="base model")
    ax.set_xticks(xs, [" ".join(r["settings"].values()) for r in rows], rotation=70, fontsize=7, ha="right")
    low = min([r["val_ndcg@10"] for r in rows] + [rows[0]["base_val_ndcg@10"]])
    ax.set_ylim(max(0.0, low - 0.05), None)
    save_line_chart(fig, ax, path, "point", "validation NDCG@10", "sweep: validation NDCG@10 per point")
