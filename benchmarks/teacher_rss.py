"""The teacher's encoding in the memory plan: what the planner counts beside what a process measures.

A taught qlora run (``teacher:``) loads its teacher once before training and encodes the training rows with
it. The plan counts that phase as the teacher's float32 weights plus one batch at its longest text
(:func:`finetune.memory.plan.encoding_bytes`, :func:`finetune.qlora.plan.teacher_bytes`). Two checks:

- ``--models``: for each model and batch size, a fresh process loads the model and encodes the data's
  longest documents (the batch that sets the peak); its peak RSS above the process before loading, beside
  the planner's count.
- ``--runs``: finished taught runs, their measured peak RSS beside the plan they recorded and the plan the
  current planner makes from the same inputs (process size, column lengths, data, teacher).

    python benchmarks/teacher_rss.py --data ../shared/data/disfl_qa --models runs/rr/qlora-disfl-mpnet-40/model \
        --batch-sizes 32 64 --runs runs/rr/distill-disfl-60 runs/rr/distill-faq-inbatch-w1-t0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402

MiB = 2**20


def child(model: str, batch: int, data: str) -> None:
    """In a fresh process: peak RSS of loading ``model`` and encoding the longest documents of ``data``."""
    import resource

    from finetune.config import DataConfig
    from finetune.data import load_data
    from finetune.memory.host import return_freed_memory
    from finetune.timing import rss_bytes

    return_freed_memory()  # as a run does
    from sentence_transformers import SentenceTransformer

    corpus = load_data(DataConfig.model_validate(data)).corpus
    documents = sorted(corpus.values(), key=len, reverse=True)[: 3 * batch]
    before = rss_bytes()
    encoder = SentenceTransformer(model, device="cpu", local_files_only=True)
    encoder.encode_document(documents, batch_size=batch, convert_to_tensor=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "parameters": sum(p.numel() for p in encoder.parameters())}))


def model_row(model: str, batch: int, data: str) -> dict:
    from finetune.config import DataConfig
    from finetune.data import load_data
    from finetune.memory.plan import encoding_bytes
    from finetune.qlora.config import TeacherConfig
    from finetune.qlora.plan import shape_of
    from finetune.qlora.teacher import find_teacher, longest_batch

    config = TeacherConfig.model_validate({"model": {"name": model, "batch_size": batch}})
    teacher = find_teacher(config)
    shape, max_len = shape_of(config.model.model_copy(update={"name": str(teacher.path)}))
    length = longest_batch(
        teacher, min(config.model.max_seq_length or max_len, max_len), load_data(DataConfig.model_validate(data))
    )
    predicted = encoding_bytes(shape, batch, length)
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, str(batch), data], capture_output=True, text=True, check=True
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    added, weights = measured["peak"] - measured["before"], 4 * measured["parameters"]
    return {
        "model": model,
        "batch_size": batch,
        "tokens": length,
        "predicted_mb": predicted / MiB,
        "measured_mb": added / MiB,
        "measured_over_predicted": added / predicted,
        "weights_mb": weights / MiB,
        "per_text_predicted_mb": (predicted - weights) / batch / MiB,
        "per_text_measured_mb": (added - weights) / batch / MiB,
    }


def run_row(run: Path) -> dict:
    """A finished taught run's measured peak RSS, its recorded plan, and the current planner's plan."""
    import yaml

    from finetune.data import load_data
    from finetune.memory.lengths import ColumnLengths
    from finetune.qlora.plan import plan_recipe
    from finetune.qlora.teacher import check_teacher
    from finetune.recipe import validate_recipe

    metrics = json.loads((run / "metrics.json").read_text())
    recipe = validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text()))
    recorded = metrics["memory_plan"]
    lengths = ColumnLengths(*(recorded["setup"]["column_lengths"] + [0])[:3])
    plan = plan_recipe(
        recipe,
        "cpu",
        load_data(recipe.data),
        lengths,
        recorded["predicted_rss"]["process"],
        check_teacher(recipe.teacher),
    )
    now = plan.rss()
    return {
        "run": str(run),
        "teacher": recipe.teacher.model.name if recipe.teacher else None,
        "teacher_cache_hit": (metrics.get("teacher") or {}).get("cache", {}).get("hit"),
        "measured_rss_mb": recorded["measured_rss_mb"],
        "recorded_plan_rss_mb": recorded["predicted_rss_mb"],
        "recorded_measured_over_predicted": recorded["rss_measured_over_predicted"],
        "plan_now_rss_mb": now["total"] / MiB,
        "plan_now_parts_mb": {k: v / MiB for k, v in now.items()},
        "plan_now_measured_over_predicted": recorded["measured_rss_mb"] / (now["total"] / MiB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/disfl_qa", help="a BEIR folder: the longest documents")
    parser.add_argument("--models", nargs="*", default=[], help="teacher folders (bi-encoders)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--runs", nargs="*", default=[], type=Path, help="finished taught qlora runs")
    parser.add_argument("--name", default="teacher_rss")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    models = [model_row(m, b, args.data) for m in args.models for b in args.batch_sizes]
    for row in models:
        print(
            f"{row['model']} batch {row['batch_size']} x {row['tokens']} tokens: "
            f"planned {row['predicted_mb']:,.0f} MiB, "
            f"measured {row['measured_mb']:,.0f} MiB (x{row['measured_over_predicted']:.2f})"
        )
    runs = [run_row(r) for r in args.runs]
    for row in runs:
        print(
            f"{row['run']}: measured {row['measured_rss_mb']:,.0f} MiB; "
            f"recorded plan {row['recorded_plan_rss_mb']:,.0f} "
            f"(x{row['recorded_measured_over_predicted']:.2f}); plan now {row['plan_now_rss_mb']:,.0f} "
            f"(x{row['plan_now_measured_over_predicted']:.2f})"
        )
    write_result(args.name, {"data": args.data, "models": models, "runs": runs})


if __name__ == "__main__":
    main()
