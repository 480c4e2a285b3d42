"""Choose one default across data sets from sweeps of the same grid, on validation only.

Each sweep directory (``python -m finetune sweep ...``) holds every point's validation NDCG@10 and
the base model's. A point's score on a data set is its relative validation gain over the base
model; the default is the point with the best *mean* relative gain over all data sets (one that
does well on both beats the best for one), with its worst-set gain as the tie-break. No test
score is read. The table lists the top points and, for comparison, each set's own best.

    python benchmarks/pick_defaults.py runs/adapter-faq-sweep-* runs/adapter-disfl-sweep-* --name defaults_adapter \
        --where loss.temperature=0.05 adapter.type=linear
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from record import write_result


def load(sweep: Path, where: dict[str, str]) -> tuple[dict, dict[tuple, dict]]:
    """What the sweep ran and chose (with its own test line), and its points by settings.

    ``where`` keeps the points whose swept ``key`` has that value and drops the key, so a sweep
    that swept it can be matched with one that held it fixed at that value."""
    summary = json.loads((sweep / "sweep.json").read_text())
    rows = {}
    for r in summary["points"]:
        settings = r["settings"]
        if all(settings.get(k, v) == v for k, v in where.items()):
            rows[tuple(sorted((k, v) for k, v in settings.items() if k not in where))] = r
    about = {
        "command": "python -m finetune sweep " + " ".join([summary["recipe"], *summary["arguments"]]),
        "chosen": summary["chosen"],
        "test_ndcg@10_of_its_choice": summary["test_ndcg@10"],
        "points": summary["points"],
    }
    return about, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep directories over the same grid, one per data set")
    parser.add_argument("--name", default="defaults")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--where", nargs="*", default=[], metavar="KEY=VALUE", help="points of sweeps that swept KEY: this value"
    )
    args = parser.parse_args()

    where = dict(w.split("=", 1) for w in args.where)
    sweeps = {Path(s).name: load(Path(s), where) for s in args.sweeps}
    common = set.intersection(*(set(rows) for _, rows in sweeps.values()))
    table = []
    for key in common:
        gains = {}
        for name, (_, rows) in sweeps.items():
            r = rows[key]
            gains[name] = r["val_ndcg@10"] / r["base_val_ndcg@10"] - 1
        table.append(
            {
                "settings": dict(key),
                "relative_val_gain": gains,
                "mean": sum(gains.values()) / len(gains),
                "worst": min(gains.values()),
                "val_ndcg@10": {n: rows[key]["val_ndcg@10"] for n, (_, rows) in sweeps.items()},
            }
        )
    table.sort(key=lambda r: (-r["mean"], -r["worst"]))
    chosen = table[0]
    own_best = {name: max(table, key=lambda r, n=name: r["relative_val_gain"][n])["settings"] for name in sweeps}
    keys = list(chosen["settings"])
    print(" | ".join(keys + [f"{n} val gain" for n in sweeps] + ["mean"]))
    for r in table[: args.top]:
        cells = [r["settings"][k] for k in keys] + [f"{r['relative_val_gain'][n]:+.2%}" for n in sweeps]
        print(" | ".join(cells + [f"{r['mean']:+.2%}"]))
    print(f"chosen (best mean relative validation gain): {chosen['settings']}")
    for name, settings in own_best.items():
        print(f"best for {name} alone: {settings}")
    write_result(
        args.name,
        {
            "sweeps": {n: about for n, (about, _) in sweeps.items()},
            "where": where,
            "points": len(table),
            "chosen": chosen,
            "best_for_one": own_best,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
