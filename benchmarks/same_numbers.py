"""Do two runs of the same recipe report the same numbers? Compare run directories pair by pair.

For a change that must not alter behaviour (a refactor): run each recipe with the code before and
after, same seeds, same machine, then compare every field of ``metrics.json`` except timings and
memory, and ``per_query.jsonl`` row for row.

    python benchmarks/same_numbers.py --before runs/before/adapter/* --after runs/after/adapter/* \
        --name same_numbers_issue35
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from record import write_result

# where the run's time and memory go: measured, so they differ between any two runs
VARYING = {"seconds", "wall_seconds", "peak_rss_mb", "step_time"}
VARYING_SUFFIXES = ("runtime", "samples_per_second", "steps_per_second")


def flat(value, prefix: str = "") -> dict[str, object]:
    """``{"a.b.0": leaf, ...}``: every leaf of nested dicts and lists by its path.

    >>> flat({"a": {"b": [1, 2]}, "c": 3})
    {'a.b.0': 1, 'a.b.1': 2, 'c': 3}
    """
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def varies(path: str) -> bool:
    parts = path.split(".")
    return any(p in VARYING or p.endswith(VARYING_SUFFIXES) for p in parts)


def compare(before: Path, after: Path) -> dict:
    """The differing fields of two runs' ``metrics.json`` (timings left out) and whether their per-query rows match."""
    # paths inside a run directory (its best checkpoint) are compared relative to it
    a, b = (
        {k: v.replace(str(d), "RUN") if isinstance(v, str) else v for k, v in flat(_metrics(d)).items()}
        for d in (before, after)
    )
    differing = {
        k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if not varies(k) and a.get(k) != b.get(k)
    }
    rows = [sorted((d / "per_query.jsonl").read_text().splitlines()) for d in (before, after)]
    metrics = _metrics(after)
    return {
        "before": str(before),
        "after": str(after),
        "kind": metrics["kind"],
        "fields_compared": sum(1 for k in a.keys() | b.keys() if not varies(k)),
        "differing": differing,
        "per_query_identical": rows[0] == rows[1],
        "test_ndcg@10": {"base": metrics["base"]["ndcg@10"], "tuned": metrics["tuned"]["ndcg@10"]},
        "wall_seconds": [_metrics(d)["wall_seconds"] for d in (before, after)],
    }


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="+", type=Path, required=True)
    parser.add_argument("--after", nargs="+", type=Path, required=True)
    parser.add_argument("--name", default="same_numbers")
    parser.add_argument("--out")
    args = parser.parse_args()
    if len(args.before) != len(args.after):
        parser.error("give as many --after run directories as --before ones, in the same order")
    pairs = [compare(a, b) for a, b in zip(args.before, args.after, strict=True)]
    for p in pairs:
        same = not p["differing"] and p["per_query_identical"]
        print(
            f"{p['kind']}: {p['fields_compared']} fields, {len(p['differing'])} differ; per-query rows "
            f"{'identical' if p['per_query_identical'] else 'differ'}; test NDCG@10 {p['test_ndcg@10']['base']:.4f} "
            f"-> {p['test_ndcg@10']['tuned']:.4f}: {'SAME' if same else 'DIFFERENT'}"
        )
    write_result(
        args.name,
        {"pairs": pairs, "same": all(not p["differing"] and p["per_query_identical"] for p in pairs)},
        args.out,
    )


if __name__ == "__main__":
    main()
