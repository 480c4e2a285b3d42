"""One sweep point on its own: train a setting and score its validation split only, never test.

A QLoRA point at the shipped 3 epochs on Disfl-QA costs about three hours on 2 CPU cores, so when one
new setting is to be compared with a finished run, retraining the finished one inside a fresh
``finetune sweep`` doubles the cost. This trains exactly what a sweep point trains (``finetune.sweep.run_point``:
the given splits file, no export, no ``eval.also``, no merge; ``selection=True`` scores the
validation queries in place of the test split) and prints its validation NDCG@10 beside the base
model's. It resumes a point cut off mid-training. ``--final RUN_DIR`` then runs the chosen point's
final run, as a sweep's ``final/`` does (``run_final``): the point's training is reused and the test split is
scored, once.

    python benchmarks/val_point.py recipes/qlora.yaml data=$DISFL_QA train.eval_steps=44 train.lr=1e-3 \\
        --splits runs/qlora-disfl-mined-3ep/splits.json --dir runs/point-disfl-lr1e-3
    python benchmarks/val_point.py <the same> --final runs/qlora-disfl-lr1e-3   # only if chosen on validation
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value, as for finetune run")
    parser.add_argument("--splits", required=True, help="the splits.json the point shares with what it is compared to")
    parser.add_argument("--dir", required=True, help="the point's run directory (resumed if cut off)")
    parser.add_argument("--final", help="after choosing this point on validation: its final run's directory")
    args = parser.parse_args()

    from finetune.recipe import load_recipe
    from finetune.sweep import run_final, run_point

    recipe = load_recipe(args.recipe, args.overrides)
    splits, point = Path(args.splits), Path(args.dir)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if not (point / "metrics.json").is_file():
        run_point(recipe, splits, point, command, str(point))
    metrics = json.loads((point / "metrics.json").read_text())
    base, val = metrics["base"]["ndcg@10"], metrics["tuned"]["ndcg@10"]
    print(f"{point}: validation NDCG@10 {base:.4f} -> {val:.4f} ({100 * (val / base - 1):+.2f}%)")
    if args.final:
        run_final(recipe, splits, point, Path(args.final), command)


if __name__ == "__main__":
    main()
