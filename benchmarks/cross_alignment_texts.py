"""How test NDCG@10 of the cross adapter's alignment moves with the number of extra alignment texts.

Loads the cross_adapter recipe with ``alignment.texts`` set, embeds every text once with both
encoders (cached), then for each count n refits ``alignment_only`` on the corpus plus the first n
texts, selecting ridge and mix on the labelled non-test queries as a run does, and scores the fixed
test split. Prints a Markdown table and writes JSON.

    python benchmarks/cross_alignment_texts.py --texts $DISFL_QA/corpus.jsonl --counts 0 150 300 600 1204 \
        --name cross_alignment_texts_faq
"""

from __future__ import annotations

import argparse

from record import write_result

from finetune.cache import EmbeddingCache
from finetune.cross.runner import CrossAdapterRun
from finetune.data import load_data
from finetune.recipe import load_recipe
from finetune.splits import make_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data=PATH")
    parser.add_argument("--recipe", default="recipes/cross_adapter.yaml")
    parser.add_argument("--texts", required=True, help="the alignment texts (.jsonl/.txt/folder)")
    parser.add_argument("--counts", type=int, nargs="+", required=True)
    parser.add_argument("--objectives", nargs="+", default=["scores", "identical_text"])
    parser.add_argument("--name", default="cross_alignment_texts")
    args = parser.parse_args()

    fixed = ["domains.leave_one_domain_out=false", "domains.per_domain=false", "train_ratios=[1.0]"]
    recipe = load_recipe(
        args.recipe, [*fixed, "mode=alignment_only", f"alignment.texts={args.texts}", *args.overrides]
    )
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    job = CrossAdapterRun(recipe, data, splits, "cpu", EmbeddingCache(recipe.cache.dir, recipe.cache.enabled))
    cells = job.cells
    small_all, large_all = cells.small.texts, cells.large.texts
    experiment = job.experiments[0]
    small_alone = cells.zero_shot(splits.test)["small model alone"]["ndcg@10"]
    rows = []
    for n in args.counts:
        cells.small.texts, cells.large.texts = small_all[:n], large_all[:n]
        cells.aligned.clear()  # the alignment fit is memoised per objective; refit on the new texts
        for objective in args.objectives:
            projection, info = cells.fit("alignment_only", objective, experiment)
            rows.append(
                {
                    "texts": min(n, len(small_all)),
                    "objective": objective,
                    "test_ndcg@10": cells.projected(splits.test, projection, "test")["ndcg@10"],
                    "chosen": {k: v for k, v in info["alignment"].items() if k != "grid"},
                }
            )
    print(f"{data.source}: {len(data.corpus)} documents; small model alone {small_alone:.4f}\n")
    print("| alignment texts | " + " | ".join(args.objectives) + " |")
    print("|---|" + "---|" * len(args.objectives))
    for n in dict.fromkeys(r["texts"] for r in rows):
        scores = [f"{r['test_ndcg@10']:.4f}" for r in rows if r["texts"] == n]
        print(f"| {n} | " + " | ".join(scores) + " |")
    write_result(args.name, {"data": data.source, "texts": args.texts, "small_alone": small_alone, "rows": rows})


if __name__ == "__main__":
    main()
