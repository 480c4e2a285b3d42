"""Teachers (issue 39): finished runs on one splits file, each against a reference run, paired per test query.

Every run is read from its own directory (metrics.json, per_query.jsonl, command.txt); nothing is typed in.
For each run: test NDCG@10, its paired 95% interval and p against the reference's tuned rows (the same test
queries), the validation figures it was chosen on, training seconds, and for a reranker its k and
milliseconds a query.

    python benchmarks/teachers.py --reference runs/rr/qlora-faq-minilm runs/rr/qlora-faq-mpnet \\
        runs/rr/distill-faq-w0 runs/rr/distill-faq-w1 runs/rr/faq-full --name teachers_faq
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from record import write_result

from finetune.qlora.behind import val_ndcg_key
from finetune.report import read_per_query
from finetune.significance import paired_metric
from finetune.splits import Splits


def _val(metrics: dict) -> dict:
    """What the run chose on: the trainer's best validation NDCG@10, or the reranker's by k."""
    if metrics["kind"] == "reranker":
        return {"val_ndcg@10_by_k": metrics["reranker"]["val_ndcg_by_k"], "k": metrics["reranker"]["k"]}
    curve = [h[key] for h in metrics.get("log_history") or [] if (key := val_ndcg_key(h)) is not None]
    return {"best_val_ndcg@10": max(curve) if curve else None}


def latency(run: Path, k: int, queries: int = 20) -> float:
    """Milliseconds to rerank one query's k documents with ``CrossEncoder(run/model)``: the first ``queries`` test
    queries, each with k corpus documents (what a second stage pays per query; cost follows the texts' lengths)."""
    import time

    import torch
    from sentence_transformers import CrossEncoder

    from finetune.data import load_data
    from finetune.recipe import load_recipe

    recipe = load_recipe(str(run / "recipe.yaml"))
    data = load_data(recipe.data)
    documents = list(data.corpus.values())
    test = Splits.load(run / "splits.json").test[:queries]
    pairs = [(data.queries[q], documents[(i * k + j) % len(documents)]) for i, q in enumerate(test) for j in range(k)]
    model = CrossEncoder(str(run / "model"), device="cpu")
    model.predict(pairs[:k], batch_size=recipe.model.batch_size)  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.predict(pairs, batch_size=recipe.model.batch_size, activation_fn=torch.nn.Identity())
    return 1000 * (time.perf_counter() - t0) / len(test)


def constant_score_loss(per_query: int, train_queries: int, pairs: int) -> float:
    """The reranker's training loss (``BinaryCrossEntropyLoss``, positives weighted by ``negatives.per_query``) when it
    gives every pair the same, best constant score: a logged loss at this level means it has not learned to rank.

    With P positive and N negative pairs and weight w, the mean weighted BCE of a constant p is
    (w P (-ln p) + N (-ln(1 - p))) / (P + N), least at p = w P / (w P + N).
    """
    import math

    w, negatives = float(per_query), per_query * train_queries
    positives = pairs - negatives
    p = w * positives / (w * positives + negatives)
    return (w * positives * -math.log(p) + negatives * -math.log(1 - p)) / pairs


def row(run: Path, reference: dict) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    tuned = read_per_query(run / "per_query.jsonl")["tuned"]
    if set(tuned) != set(reference):
        raise SystemExit(f"{run}: its test queries differ from the reference's; run both on one splits.file")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    out = {
        "run": f"{run.parent.name}/final" if run.name == "final" else run.name,  # a sweep's final run: by its sweep
        "command": (run / "command.txt").read_text().strip(),
        "kind": metrics["kind"],
        "model": recipe["model"]["name"],
        "test_ndcg@10": metrics["tuned"]["ndcg@10"],
        "base_test_ndcg@10": metrics["base"]["ndcg@10"],
        "vs_reference": paired_metric(reference, tuned, "ndcg@10"),
        "train_seconds": (metrics.get("seconds") or {}).get("train"),
        "teacher": metrics.get("teacher"),
        "stored_precision": metrics.get("precision"),  # test NDCG@10 at float32, int8 and binary (bi-encoders)
        "wall_seconds": metrics.get("wall_seconds"),
        "stages": metrics.get("stages"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "predicted_rss_mb": (metrics.get("memory_plan") or {}).get("predicted_rss_mb"),
        **_val(metrics),
    }
    if metrics["kind"] == "reranker":  # at the chosen k as the run timed it, and measured here at k = 10 and 50
        trained = metrics["reranker"]
        losses = [e["loss"] for e in trained["log_history"]]
        out["training"] = {
            "steps": trained["steps"],
            "train_pairs": trained["train_pairs"],
            "mean_loss": trained["train_loss"],
            "logged_losses": losses,
            "constant_score_loss": constant_score_loss(
                recipe["negatives"]["per_query"], len(Splits.load(run / "splits.json").train), trained["train_pairs"]
            ),
        }
        out["rerank_ms_per_query"] = {k: 1000 * v for k, v in metrics["seconds"].items() if k.startswith("rerank_")}
        out["rerank_ms_per_query"] |= {f"measured_at_k{k}": latency(run, k) for k in (10, 50)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="the run every other is paired against")
    parser.add_argument("--name", required=True, help="results/<name>.json")
    args = parser.parse_args()
    reference = read_per_query(args.reference / "per_query.jsonl")["tuned"]
    rows = [row(r, reference) for r in [args.reference, *args.runs]]
    for r in rows:
        d = r["vs_reference"]
        print(
            f"{r['run']:<28} test NDCG@10 {r['test_ndcg@10']:.4f}  vs reference {d['difference']:+.4f} "
            f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] p {d['p_value']:.4f}"
        )
    write_result(args.name, {"reference": args.reference.name, "rows": rows})


if __name__ == "__main__":
    main()
