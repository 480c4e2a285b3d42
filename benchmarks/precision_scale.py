"""The stored-precision stage at real size: seconds and peak RSS of scoring test queries against 10^4 to 10^5
documents at float32, int8 and binary (``finetune.precision.ndcg_at_precision``).

Cost does not depend on the embeddings' values, so random 384-d vectors stand in (all-MiniLM-L6-v2's width).
Each size runs in a fresh process, so each peak RSS is its own; each time is the fastest of ``--repeats`` calls,
since a single call of a fraction of a second on a shared machine is mostly noise.

    python benchmarks/precision_scale.py                         # 10^4, 3x10^4, 10^5 documents, 1,600 queries
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

from record import write_result

CHILD = """
import json, resource, time, torch
from finetune.precision import PRECISIONS, ndcg_at_precision
g = torch.Generator().manual_seed(0)
d, q = torch.randn({n}, {dim}, generator=g), torch.randn({queries}, {dim}, generator=g)
relevant = [{{i}} for i in range({queries})]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
seconds = {{}}
for p in PRECISIONS:
    times = []
    for _ in range({repeats}):
        t0 = time.perf_counter()
        ndcg_at_precision(q, d, relevant, p)
        times.append(time.perf_counter() - t0)
    seconds[p] = min(times)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
size = {n} * {dim} * 4 / 2**20
print(json.dumps({{"seconds": seconds, "rss_mb_before": start, "peak_rss_mb": peak, "embeddings_mb": size}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--queries", type=int, default=1_600)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3, help="calls per precision; the fastest is kept")
    args = parser.parse_args()
    rows = {}
    for n in args.sizes:
        code = CHILD.format(n=n, dim=args.dim, queries=args.queries, repeats=args.repeats)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows[n] = json.loads(out.strip().splitlines()[-1])
        rows[n]["rss_growth_mb"] = rows[n]["peak_rss_mb"] - rows[n]["rss_mb_before"]
        print(n, json.dumps(rows[n]))
    small, large = min(rows), max(rows)
    exponents = {
        p: math.log(rows[large]["seconds"][p] / rows[small]["seconds"][p]) / math.log(large / small)
        for p in rows[small]["seconds"]
    }
    print("growth exponents:", exponents)
    payload = {
        "queries": args.queries,
        "dim": args.dim,
        "repeats": args.repeats,
        "sizes": rows,
        "exponents": exponents,
    }
    write_result("precision_scale", payload)


if __name__ == "__main__":
    main()
