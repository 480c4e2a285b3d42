"""The before/after table printed at the end of a run, and the per-query scores beside it."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.atomic import write_text
from finetune.evaluation import HEADLINE


def metrics_table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...] = HEADLINE) -> str:
    """A fixed-width table, one column per model (e.g. ``base``, ``tuned``) plus the change of the last over the first.

    Example:
        >>> print(metrics_table({"base": {"ndcg@10": 0.70}, "tuned": {"ndcg@10": 0.75}}, ("ndcg@10",)))
        metric           base    tuned        Δ
        ndcg@10        0.7000   0.7500  +0.0500
    """
    names = list(rows)
    header = f"{'metric':<12}" + "".join(f"{n:>9}" for n in names) + (f"{'Δ':>9}" if len(names) > 1 else "")
    lines = [header]
    for m in metrics:
        values = [rows[n].get(m) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{v:>9.4f}" if v is not None else f"{'-':>9}" for v in values)
        delta = f"{values[-1] - values[0]:>+9.4f}" if len(names) > 1 and None not in (values[0], values[-1]) else ""
        lines.append(f"{m:<12}{cells}{delta}")
    return "\n".join(lines)


def write_per_query(path: Path, per_query: dict[str, dict[str, dict[str, float]]]) -> None:
    """``per_query.jsonl``: one row per test query and model, ``{"query_id", "model", "ndcg@10", ...}``."""
    rows = [
        {"query_id": q, "model": model, **values}
        for model, scores in per_query.items()
        for q, values in sorted(scores.items())
    ]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_per_query(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The inverse of :func:`write_per_query`: model -> query id -> metric values."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.setdefault(row.pop("model"), {})[row.pop("query_id")] = row
    return out


def save_line_chart(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and legend a line chart, write it to ``path`` as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    from finetune.atomic import atomic_path

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
