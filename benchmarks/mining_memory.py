"""Mining's memory as the corpus grows: one block of every training query against the corpus, or bounded blocks.

sentence-transformers' ``mine_hard_negatives`` scores 16,384 queries at a time against the whole corpus
(its ``faiss_batch_size``), so Disfl-QA's 5,579 training queries made one queries x corpus block: the
qlora scale run at 10^5 passages peaked 2.1 GiB above its 3 x 10^4 run, all of it in mining. The toolkit
now passes a block of at most ``finetune.evaluation.CHUNK_CELLS`` scores (``query_chunk_size``).

Each (variant, size) runs ``finetune.mining.find_negatives`` in its own process on random unit
embeddings (cost does not depend on the values) and reports the peak RSS above what the process held
before mining, and mining's seconds. ``whole`` sets the cap so high that the block is every query, as
before the change.

    python benchmarks/mining_memory.py --sizes 10000 30000 100000 --bounded-only 1000000

Writes ``results/mining_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402

QUERIES = 5_579  # Disfl-QA's training queries
DIM = 384  # all-MiniLM-L6-v2


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, n_documents: int) -> dict:
    """In this process: mine one negative per query over ``n_documents`` random documents."""
    import torch

    import finetune.evaluation as evaluation
    from finetune.config import NegativesConfig
    from finetune.data.dataset import RetrievalData
    from finetune.mining import find_negatives

    if variant == "whole":
        evaluation.CHUNK_CELLS = 2**62  # every query in one block, as sentence-transformers' default did
    generator = torch.Generator().manual_seed(0)
    queries = {f"q{i}": f"query {i}" for i in range(QUERIES)}
    corpus = {f"d{i}": f"document {i}" for i in range(n_documents)}
    data = RetrievalData(queries, corpus, {f"q{i}": {f"d{i}"} for i in range(QUERIES)})
    lookup = evaluation.EmbeddingLookup(
        list(queries.values()),
        torch.nn.functional.normalize(torch.randn(QUERIES, DIM, generator=generator), dim=-1),
        list(corpus.values()),
        torch.nn.functional.normalize(torch.randn(n_documents, DIM, generator=generator), dim=-1),
    )
    before = peak_mib()
    start = time.perf_counter()
    find_negatives(data, list(queries), NegativesConfig(strategy="mined", per_query=1), model=lookup)
    return {
        "variant": variant,
        "n_documents": n_documents,
        "queries": QUERIES,
        "block_queries": min(QUERIES, evaluation.query_chunk_size(n_documents)),
        "mining_s": time.perf_counter() - start,
        "peak_rss_before_mb": before,
        "peak_rss_mb": peak_mib(),
        "mining_added_mb": peak_mib() - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--bounded-only", type=int, nargs="*", default=[], help="sizes too large for 'whole'")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    rows = []
    points = [(v, n) for n in args.sizes for v in ("whole", "bounded")] + [("bounded", n) for n in args.bounded_only]
    for variant, n in points:
        out = subprocess.run(
            [sys.executable, __file__, "--one", variant, str(n)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by = {(r["variant"], r["n_documents"]): r for r in rows}
    ratios = {str(n): by[("bounded", n)]["mining_added_mb"] / by[("whole", n)]["mining_added_mb"] for n in args.sizes}
    write_result("mining_memory", {"rows": rows, "added_memory_bounded_over_whole": ratios})


if __name__ == "__main__":
    main()
