"""The before/after table printed at the end of a run."""

from __future__ import annotations

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
