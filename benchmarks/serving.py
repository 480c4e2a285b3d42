"""From run to index: ONNX throughput and fidelity, and a real vector database round trip, on finished runs.

1. ONNX (a qlora run made with ``export.onnx=true``): CPU encoding throughput of the run's corpus through
   PyTorch (``SentenceTransformer(run/model)``), ONNX fp32 and ONNX int8 (onnxruntime), same texts, batch
   and threads, rounds alternating so drift hits all three; and the run's own int8 check (test NDCG@10 of
   int8 ONNX against PyTorch, ``metrics.json["export"]["onnx"]``).
2. Round trip: each run's corpus indexed in Qdrant (local mode) and its test split scored from the
   database's results (:func:`finetune.vector_db.round_trip`), against the run's ``metrics.json``.

    python -m finetune run recipes/qlora.yaml export.onnx=true --run-dir runs/serving-qlora-faq
    python -m finetune run recipes/adapter.yaml --run-dir runs/serving-adapter-faq
    python benchmarks/serving.py --onnx runs/serving-qlora-faq \\
        --round-trip runs/serving-qlora-faq runs/serving-adapter-faq
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from record import write_result


def throughput(run_dir: Path, rounds: int, threads: int, batch: int) -> dict:
    """Texts per second of the run's corpus through PyTorch, ONNX fp32 and ONNX int8 (medians over rounds)."""
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.onnx_export import OnnxEncoder
    from finetune.recipe import load_recipe

    torch.set_num_threads(threads)
    texts = list(load_data(load_recipe(str(run_dir / "recipe.yaml")).data).corpus.values())
    model = SentenceTransformer(str(run_dir / "model"), device="cpu")
    onnx = {p: OnnxEncoder(run_dir / "model", p, model, threads) for p in ("fp32", "int8")}
    encoders = {
        "pytorch": lambda: model.encode_document(texts, batch_size=batch),
        "onnx_fp32": lambda: onnx["fp32"].encode(texts, batch_size=batch),
        "onnx_int8": lambda: onnx["int8"].encode(texts, batch_size=batch),
    }
    seconds = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, encode in encoders.items():
            start = time.perf_counter()
            encode()
            seconds[name].append(time.perf_counter() - start)
    per_second = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    return {
        "texts": len(texts),
        "batch_size": batch,
        "threads": threads,
        "rounds": rounds,
        "seconds": seconds,
        "texts_per_second": per_second,
        "ratio_to_pytorch": {name: per_second[name] / per_second["pytorch"] for name in per_second},
        "check": json.loads((run_dir / "metrics.json").read_text())["export"]["onnx"],
        "precision": json.loads((run_dir / "metrics.json").read_text())["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="a qlora run directory made with export.onnx=true")
    parser.add_argument("--round-trip", type=Path, nargs="*", default=[], help="qlora or adapter run directories")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--name", default="serving_faq")
    args = parser.parse_args()

    from qdrant_client import QdrantClient

    from finetune.vector_db import round_trip

    targets = {"fp32_min_cosine": 0.999, "int8_ndcg_within": 0.005, "int8_speedup": 1.5, "db_within": 1e-3}
    payload = {"targets": targets}
    if args.onnx:
        payload["onnx"] = throughput(args.onnx, args.rounds, args.threads, args.batch_size)
        print(json.dumps(payload["onnx"]["ratio_to_pytorch"], indent=1))
    payload["round_trip"] = {}
    for run_dir in args.round_trip:
        start = time.perf_counter()
        report = round_trip(run_dir, QdrantClient(":memory:"))
        report["seconds"] = time.perf_counter() - start
        report["precision"] = json.loads((run_dir / "metrics.json").read_text())["precision"]
        payload["round_trip"][str(run_dir)] = report
        print(run_dir, json.dumps(report))
    write_result(args.name, payload)


if __name__ == "__main__":
    main()
