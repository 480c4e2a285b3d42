"""Wall time of the README's adapter sweep on a warm embedding cache, as a whole command.

Runs ``python -m finetune sweep recipes/adapter.yaml <grid>`` once to warm the cache (not
counted), then ``--repeats`` times into fresh sweep directories, and prints the median wall time,
the points run and the time per point.

    python benchmarks/sweep_time.py --name sweep_time_faq
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import write_result

GRID = ["train.lr=3e-4,1e-3,3e-3", "negatives.strategy=none,random,mined", "adapter.type=linear,mlp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/adapter.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="sweep_time")
    parser.add_argument(
        "grid", nargs="*", default=GRID, help="the sweep's key=v1,v2 arguments (default: the README's)"
    )
    args = parser.parse_args()

    seconds, points = [], None
    for repeat in range(args.repeats + 1):  # the first run warms the embedding cache and is not counted
        out = Path(tempfile.mkdtemp(prefix="sweep-time-")) / "sweep"
        command = [sys.executable, "-m", "finetune", "sweep", args.recipe, *args.grid, "--dir", str(out)]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        if repeat:
            seconds.append(time.perf_counter() - t0)
        points = len(json.loads((out / "sweep.json").read_text())["points"])
    median = statistics.median(seconds)
    print(
        f"{points} points: median {median:.1f} s ({median / points:.2f} s a point, final run included); all {seconds}"
    )
    write_result(
        args.name,
        {"recipe": args.recipe, "grid": args.grid, "points": points, "median_seconds": median, "all": seconds},
    )


if __name__ == "__main__":
    main()
