"""Is the gain real? Paired bootstrap intervals and a sign-flip test over per-query scores.

Test splits are small (101 FAQ queries), so a +0.02 NDCG@10 may be noise. Both models are scored
on the same queries, so the honest comparison is paired: the per-query difference
``tuned - base``. :func:`paired_difference` resamples those differences (a percentile bootstrap
of their mean, seeded) for a 95% interval, and flips their signs at random for a two-sided
p-value (under "no difference" each query's difference is as likely positive as negative).

Example:
    >>> base = {"q1": 0.5, "q2": 0.0, "q3": 1.0, "q4": 0.5}
    >>> tuned = {"q1": 1.0, "q2": 0.5, "q3": 1.0, "q4": 1.0}
    >>> result = paired_difference(base, tuned, resamples=2000, seed=0)
    >>> result["difference"], result["n"]
    (0.375, 4)
    >>> result["ci_low"] > 0
    True
"""

from __future__ import annotations

import numpy as np

from finetune.errors import FinetuneError

# per-query values kept for every test query; the means of the first three are the evaluator's
# ndcg@10, mrr@10 and accuracy@1, and of the last its recall@10
PER_QUERY = ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")
RESAMPLES = 10_000


def paired_difference(
    base: dict[str, float], tuned: dict[str, float], resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """Mean of ``tuned - base`` over the shared query ids, its 95% bootstrap interval and a sign-flip p-value.

    Args:
        base, tuned: Query id -> metric value; both must hold the same ids.
        resamples: Bootstrap resamples and sign-flip permutations.
        seed: Fixes both.

    Returns:
        ``{"difference", "ci_low", "ci_high", "p_value", "n", "significant"}``; ``significant``
        is true when the interval excludes 0.
    """
    if set(base) != set(tuned):
        missing = sorted(set(base) ^ set(tuned))[:3]
        raise FinetuneError(
            f"the two score sets are not over the same queries (e.g. {missing})", where="paired comparison"
        )
    ids = sorted(base)
    diffs = np.array([tuned[q] - base[q] for q in ids], dtype=np.float64)
    n = len(diffs)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    observed = abs(diffs.mean())
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    flipped = np.abs((signs * diffs).mean(axis=1))
    p_value = (1 + int((flipped >= observed - 1e-12).sum())) / (resamples + 1)
    return {
        "difference": float(diffs.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": float(p_value),
        "n": n,
        "significant": bool(low > 0 or high < 0),
    }


def mean_interval(values: list[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (one model's per-query scores)."""
    x = np.asarray(values, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_metric(base: dict, tuned: dict, metric: str = "ndcg@10", resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """:func:`paired_difference` of one metric between two per-query score sets (query id -> {metric: value})."""
    return paired_difference(
        {q: v[metric] for q, v in base.items()}, {q: v[metric] for q, v in tuned.items()}, resamples, seed
    )


def compare_rows(per_query: dict[str, dict[str, dict[str, float]]], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """For each metric of :data:`PER_QUERY`, ``paired_difference(base, tuned)``.

    Args:
        per_query: ``{"base": {qid: {metric: value}}, "tuned": {...}}``.
    """
    return {m: paired_metric(per_query["base"], per_query["tuned"], m, resamples, seed) for m in PER_QUERY}


def describe(stats: dict, split: str = "test") -> str:
    """Lines for the run's table: each metric's difference, interval and p-value; * where the interval excludes 0.

    ``split`` names the queries scored: ``validation`` for a sweep point, which never scores test."""
    n = next(iter(stats.values()))["n"]
    lines = [f"tuned - base, paired over {n} {split} queries ({RESAMPLES:,} resamples):"]
    for metric, s in stats.items():
        mark = " *" if s["significant"] else ""
        interval = f"95% CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
        lines.append(f"  {metric:<11}{s['difference']:>+9.4f}  {interval}  p {s['p_value']:.4f}{mark}")
    lines.append("  * the interval excludes 0")
    return "\n".join(lines)
