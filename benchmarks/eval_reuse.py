"""Evaluating a frozen-document recipe: reusing the cached corpus embeddings against re-encoding.

A query adapter never changes document embeddings, so each evaluation (every epoch on the
validation split, and the final test) can reuse the corpus embeddings computed once. The
alternative is what an evaluator does when handed a model: encode the corpus again every time.
Both sides score the same adapter-free base model on the same queries with the shared evaluator;
the script checks the metrics agree and prints the time per evaluation and the ratio.

    python benchmarks/eval_reuse.py --data ../shared/data/disfl_qa
"""

from __future__ import annotations

import argparse
import statistics
import time

from record import write_result

from finetune.adapter.runner import AdapterRun
from finetune.cache import EmbeddingCache
from finetune.data import load_data
from finetune.evaluation import build_evaluator, evaluate
from finetune.recipe import load_recipe
from finetune.splits import make_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/adapter.yaml")
    parser.add_argument("--data", default="../shared/data/disfl_qa")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument(
        "--repeats", type=int, default=2, help="re-encoding evaluations to time (reuse is timed 5x that)"
    )
    parser.add_argument("--out")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, [f"data={args.data}"])
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    run = AdapterRun(recipe, data, splits, "cpu", EmbeddingCache(recipe.cache.dir))  # embeds once (or reads the cache)
    evaluator = build_evaluator(data, getattr(splits, args.split), args.split, batch_size=recipe.model.batch_size)

    def timed(fn, n):
        times, out = [], None
        for _ in range(n):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    reuse_s, reuse = timed(
        lambda: evaluate(evaluator, run.lookup(), corpus_embeddings=run.documents), 5 * args.repeats
    )
    encode_s, encoded = timed(lambda: evaluate(evaluator, run.model), args.repeats)
    gap = max(abs(reuse[k] - encoded[k]) for k in ("ndcg@10", "mrr@10", "accuracy@1"))
    ratio = encode_s / reuse_s
    print(f"{len(evaluator.queries)} {args.split} queries, {len(evaluator.corpus)} documents")
    print(f"reuse corpus embeddings: {reuse_s:.3f} s per evaluation (NDCG@10 {reuse['ndcg@10']:.4f})")
    print(f"re-encode every time:    {encode_s:.3f} s per evaluation (NDCG@10 {encoded['ndcg@10']:.4f})")
    print(f"speed-up: {ratio:.0f}x (target >= 10x); largest metric difference {gap:.2e}")
    write_result(
        "eval_reuse",
        {
            "data": data.source,
            "split": args.split,
            "queries": len(evaluator.queries),
            "documents": len(evaluator.corpus),
            "reuse_seconds": reuse_s,
            "reencode_seconds": encode_s,
            "speedup": ratio,
            "target": 10,
            "ndcg@10": {"reuse": reuse["ndcg@10"], "reencode": encoded["ndcg@10"]},
            "max_metric_difference": gap,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
