"""Encoding cost in the toolkit: throughput against sentence-transformers, and the embedding cache.

1. Throughput: the toolkit's path (``EmbeddingCache.encode`` with the cache off) against
   sentence-transformers' own ``encode_document``, same model, texts and batch size. Rounds
   alternate so drift on a noisy machine hits both; medians and their ratio (1.0 = no overhead).
2. Cache: corpus and unique queries through ``EmbeddingCache`` into an empty temporary folder
   (a miss: the model runs), then again (a hit: safetensors read); the second run's time as a
   fraction of the first (target at most 5%), and a check that the embeddings are identical.

Model loading is outside every timing.

    python benchmarks/encoding.py                                # FAQ
    python benchmarks/encoding.py --data ../shared/data/disfl_qa --out benchmarks/results/encoding_disfl.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from record import write_result

from finetune.cache import EmbeddingCache
from finetune.data import load_data
from finetune.models import load_sentence_transformer, model_identity
from finetune.recipe import load_recipe


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def throughput(model, identity, texts, batch, rounds) -> dict:
    toolkit = EmbeddingCache(enabled=False)
    paths = {
        "sentence_transformers": lambda: model.encode_document(
            texts, batch_size=batch, normalize_embeddings=True, convert_to_tensor=True
        ),
        "toolkit": lambda: toolkit.encode(model, identity, texts, "document", batch_size=batch),
    }
    paths["toolkit"]()  # warm-up
    times, out = {k: [] for k in paths}, {}
    for _ in range(rounds):
        for name, fn in paths.items():
            seconds, out[name] = timed(fn)
            times[name].append(seconds)
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    same = torch.allclose(out["toolkit"], out["sentence_transformers"].float().cpu(), atol=1e-6)
    return {
        "texts": len(texts),
        "seconds": times,
        "sentences_per_second": rate,
        "ratio": rate["toolkit"] / rate["sentence_transformers"],
        "same_embeddings": same,
    }


def cache_speed(model, identity, docs, queries, batch) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(folder)
        runs = [
            timed(
                lambda: (
                    cache.encode(model, identity, docs, "document", batch_size=batch),
                    cache.encode(model, identity, queries, "query", batch_size=batch),
                )
            )
            for _ in range(2)
        ]
    assert (cache.misses, cache.hits) == (2, 2), (cache.misses, cache.hits)
    (first, a), (second, b) = runs
    return {
        "documents": len(docs),
        "queries": len(queries),
        "first_seconds": first,
        "second_seconds": second,
        "ratio": second / first,
        "target": 0.05,
        "identical": all(torch.equal(x, y) for x, y in zip(a, b)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/adapter.yaml")
    parser.add_argument("--data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, [f"data={args.data}"] if args.data else [])
    data = load_data(recipe.data)
    model, resolved, _ = load_sentence_transformer(recipe.model, "cpu")
    identity, batch = model_identity(resolved.path), recipe.model.batch_size
    docs, queries = list(data.corpus.values()), list(dict.fromkeys(data.queries.values()))

    speed = throughput(model, identity, docs, batch, args.rounds)
    for k, v in speed["sentences_per_second"].items():
        print(f"{k:<22} {v:,.1f} sentences/s (median of {args.rounds})")
    print(
        f"toolkit / sentence-transformers throughput: {speed['ratio']:.3f}; same embeddings: "
        f"{speed['same_embeddings']}"
    )
    cache = cache_speed(model, identity, docs, queries, batch)
    print(
        f"cache: {len(docs)} documents + {len(queries)} queries, first run {cache['first_seconds']:.2f} s, second "
        f"{cache['second_seconds']:.3f} s"
    )
    print(f"second/first: {100 * cache['ratio']:.2f}% (target <= 5%); identical embeddings: {cache['identical']}")
    write_result("encoding", {"data": data.source, "batch_size": batch, "throughput": speed, "cache": cache}, args.out)


if __name__ == "__main__":
    main()
