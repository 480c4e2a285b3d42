"""What ``eval.also`` (and ``merge.scale: auto``) add to a warm-cache frozen-encoder run.

Runs the same recipe as whole commands (``python -m finetune run ...``), once to warm the cache
and then ``--repeats`` times per variant, interleaved, and prints the median wall time of each
variant and its ratio to the plain run, measured side by side in one invocation.

    python benchmarks/extra_sets_cost.py --also $DISFL_QA --name extra_sets_cost_faq
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from record import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/adapter.yaml")
    parser.add_argument("--also", required=True, help="the eval.also data (a path or builtin name)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="extra_sets_cost")
    args = parser.parse_args()

    variants = {
        "plain": [],
        "eval.also": [f"eval.also=[{args.also}]"],
        "eval.also + merge.scale auto": [f"eval.also=[{args.also}]", "merge.scale=auto", "merge.max_drop=0.01"],
    }
    out = tempfile.mkdtemp(prefix="extra-sets-cost-")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats + 1):  # the first round warms the embedding cache and is not counted
        for variant, overrides in variants.items():
            command = [sys.executable, "-m", "finetune", "run", args.recipe, f"output.dir={out}", *overrides]
            t0 = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            if repeat:
                seconds[variant].append(time.perf_counter() - t0)
    plain = statistics.median(seconds["plain"])
    rows = []
    for variant, times in seconds.items():
        median = statistics.median(times)
        rows.append({"variant": variant, "median_seconds": median, "ratio_to_plain": median / plain, "all": times})
        print(f"{variant:32s} {median:6.2f} s  x{median / plain:.3f}")
    write_result(args.name, {"recipe": args.recipe, "also": args.also, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
