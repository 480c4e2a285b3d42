"""Adapter training over cached embeddings: the toolkit's loop against a seed-style loop.

The seed-style loop is what embedding-adapter notebooks usually do: a per-item ``Dataset`` whose
``__getitem__`` draws one random negative, a ``DataLoader``, triplet loss. It runs at each of
``--seed-batch-sizes``: 1 (``DataLoader``'s default, one update per example, as in Chroma's
adapter notebook) and the recipe's batch size (the toolkit's own). Both train the same
``LinearAdapter`` with the same loss (triplet, one negative per pair), optimizer, learning rate and
number of epochs on the same cached embeddings; the script prints examples per second for each,
the ratios, and the test NDCG@10 each reaches with the shared evaluator.

    python benchmarks/adapter_training_speed.py                                   # FAQ
    python benchmarks/adapter_training_speed.py --data ../shared/data/disfl_qa --epochs 2 \
        --out benchmarks/results/adapter_training_speed_disfl.json
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from record import write_result
from torch.utils.data import DataLoader, Dataset

from finetune.adapter.losses import triplet_loss
from finetune.adapter.modules import LinearAdapter
from finetune.adapter.negatives import NegativeSampler, relevance_keys
from finetune.adapter.runner import AdapterRun
from finetune.adapter.train import train_adapter
from finetune.cache import EmbeddingCache
from finetune.data import load_data
from finetune.evaluation import build_evaluator, evaluate
from finetune.recipe import load_recipe
from finetune.splits import make_splits


class SeedStyleDataset(Dataset):
    """One (query, positive, random negative) triple per item; the negative is drawn in ``__getitem__``."""

    def __init__(self, queries, documents, pairs, relevant: dict[int, set[int]]):
        self.queries, self.documents, self.pairs, self.relevant = queries, documents, pairs.tolist(), relevant

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        q, d = self.pairs[i]
        while True:
            n = random.randrange(len(self.documents))
            if n not in self.relevant[q]:
                break
        return self.queries[q], self.documents[d], self.documents[n]


def seed_style_train(
    adapter, queries, documents, pairs, relevant, epochs, batch_size, lr, weight_decay, margin, seed
) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(SeedStyleDataset(queries, documents, pairs, relevant), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for q, pos, neg in loader:
            loss = triplet_loss(adapter(q), pos, neg.unsqueeze(1), margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/adapter.yaml")
    parser.add_argument("--data", help="data override, e.g. ../shared/data/disfl_qa")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        choices=range(1, 100),
        metavar="N",
        help="timed runs per side (the fastest counts)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()

    overrides = ["loss.type=triplet", "negatives.per_query=1", f"train.epochs={args.epochs}", "train.warmup_ratio=0"]
    recipe = load_recipe(args.recipe, overrides + ([f"data={args.data}"] if args.data else []))
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    run = AdapterRun(recipe, data, splits, "cpu", EmbeddingCache(recipe.cache.dir))
    pairs, all_pairs = run.pairs(splits.train), run.pairs(list(data.queries))
    relevant: dict[int, set[int]] = {}
    for q, d in all_pairs.tolist():
        relevant.setdefault(q, set()).add(d)
    test = build_evaluator(data, splits.test, "test")
    t = recipe.train
    examples = len(pairs) * args.epochs

    def train(name, batch):
        torch.manual_seed(recipe.seed)
        adapter = LinearAdapter(run.documents.shape[1])
        start = time.perf_counter()
        if name == "toolkit":
            sampler = NegativeSampler(run.documents, relevance_keys(all_pairs, len(run.doc_ids)))
            train_adapter(adapter, run.queries, run.documents, pairs, sampler, recipe.loss, t, recipe.seed)
        else:
            seed_style_train(
                adapter,
                run.queries,
                run.documents,
                pairs,
                relevant,
                args.epochs,
                batch,
                t.lr,
                t.weight_decay,
                recipe.loss.margin,
                recipe.seed,
            )
        return adapter, time.perf_counter() - start

    results = {}
    sides = [("toolkit", t.batch_size)] + [(f"seed_style_batch{b}", b) for b in args.seed_batch_sizes]
    times, trained = {name: [] for name, _ in sides}, {}
    for round_ in range(args.repeats):  # alternate the order so warm-up and drift hit every side
        for name, batch in sides if round_ % 2 == 0 else sides[::-1]:
            trained[name], seconds = train(name, batch)  # seeded: every round trains the same adapter
            times[name].append(seconds)
    for name, batch in sides:
        adapter, seconds = trained[name].eval(), min(times[name])
        ndcg = evaluate(test, run.lookup(adapter), corpus_embeddings=run.documents)["ndcg@10"]
        results[name] = {
            "batch_size": batch,
            "seconds": seconds,
            "examples_per_second": examples / seconds,
            "test_ndcg@10": ndcg,
        }
        print(
            f"{name:<20} batch {batch:>4}: {examples} examples in {seconds:.2f} s = {examples / seconds:,.0f} "
            f"examples/s; test NDCG@10 {ndcg:.4f}"
        )

    speedups = {}
    for name, r in results.items():
        if name != "toolkit":
            speedups[name] = results["toolkit"]["examples_per_second"] / r["examples_per_second"]
            gap = results["toolkit"]["test_ndcg@10"] - r["test_ndcg@10"]
            print(
                f"toolkit vs {name}: {speedups[name]:.1f}x examples/s (target >= 20x); NDCG@10 difference {gap:+.4f}"
            )
    write_result(
        "adapter_training_speed",
        {
            "data": data.source,
            "train_pairs": len(pairs),
            "epochs": args.epochs,
            "lr": t.lr,
            "loss": "triplet, 1 negative",
            "results": results,
            "speedups": speedups,
            "target": 20,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
