"""Effect of the negatives strategy on test NDCG@10, for both recipe families, on one splits file.

Runs each (recipe, strategy) once with everything else as the recipe ships, all on the test
queries of the first run, and writes a table of base and tuned test metrics:

    python benchmarks/negatives_effect.py                                   # FAQ
    python benchmarks/negatives_effect.py --data ../shared/data/disfl_qa --name disfl --set qlora:train.eval_steps=44
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from record import RESULTS, write_result

from finetune.atomic import write_text
from finetune.recipe import load_recipe
from finetune.run import run_recipe

STRATEGIES = {
    "adapter": ["none", "random", "mined", "bm25"],
    "qlora": ["none", "mined", "bm25"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data for every run (default: each recipe's own, the FAQ)")
    parser.add_argument("--name", default="faq", help="results go to benchmarks/results/negatives_<name>.json/.md")
    parser.add_argument("--families", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--per-query", type=int, default=1, help="negatives per example for random/mined/bm25")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FAMILY:KEY=VALUE", help="override for one family's recipe"
    )
    parser.add_argument("--runs", default="runs/negatives", help="where the run directories go")
    args = parser.parse_args()

    rows, splits_file = [], None
    for family in args.families:
        extra = [s.split(":", 1)[1] for s in args.set if s.startswith(f"{family}:")]
        for strategy in STRATEGIES[family]:
            overrides = [
                f"name={family}-{args.name}-{strategy}",
                f"output.dir={args.runs}",
                f"negatives.strategy={strategy}",
                *extra,
            ]
            # in-batch only: per_query has no effect, so it goes back to its default (the recipe refuses any other
            # value)
            overrides.append(f"negatives.per_query={args.per_query if strategy != 'none' else 1}")
            if args.data:
                overrides.append(f"data={args.data}")
            if splits_file:
                overrides.append(f"splits.file={splits_file}")
            run_dir = run_recipe(
                load_recipe(f"recipes/{family}.yaml", overrides), command="negatives_effect " + " ".join(overrides)
            )
            splits_file = splits_file or str(run_dir / "splits.json")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append(
                {
                    "family": family,
                    "strategy": strategy,
                    "per_query": 0 if strategy == "none" else args.per_query,
                    "base_ndcg@10": metrics["base"]["ndcg@10"],
                    "ndcg@10": metrics["tuned"]["ndcg@10"],
                    "mrr@10": metrics["tuned"]["mrr@10"],
                    "train_seconds": metrics["seconds"]["train"],
                    "negatives": metrics.get("negatives"),
                    "run_dir": str(run_dir),
                }
            )
            _write(args, rows, splits_file)  # after every run, so a long sweep shows progress


def _write(args, rows: list[dict], splits_file: str) -> None:
    test = len(json.loads(Path(splits_file).read_text())["test"])
    lines = [
        f"Test NDCG@10 on {args.data or 'the FAQ'} ({test} test queries, one splits file for every row); "
        "`none` = in-batch negatives only.",
        "",
        "| recipe | negatives | per query | base | tuned | Δ vs none | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        none = next((x["ndcg@10"] for x in rows if x["family"] == r["family"] and x["strategy"] == "none"), None)
        delta = f"{r['ndcg@10'] - none:+.4f}" if none is not None else ""
        lines.append(
            f"| {r['family']} | {r['strategy']} | {r['per_query']} | {r['base_ndcg@10']:.4f} | {r['ndcg@10']:.4f} | "
            f"{delta} | {r['train_seconds']:.1f} s |"
        )
    table = "\n".join(lines) + "\n"
    write_text(RESULTS / f"negatives_{args.name}.md", table)
    write_result(f"negatives_{args.name}", {"splits_file": splits_file, "rows": rows, "table": table})
    print(table)


if __name__ == "__main__":
    main()
