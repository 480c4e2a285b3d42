"""A real vector database (Qdrant, local mode) and a real embedding client (fastembed over the ONNX export) give
the run's own test NDCG@10; the adapter's tuned queries search the index built once with the base model.

The client is imported at the top: a missing client is an error here, never a skip."""

import pytest
from conftest import COLUMNS_PAIRS, adapter_recipe, qlora_onnx_run
from qdrant_client import QdrantClient

from finetune.recipe import validate_recipe
from finetune.run import run_recipe
from finetune.vector_db import round_trip


def test_qlora_onnx_through_fastembed_and_qdrant_gives_the_runs_number(tiny_model, tmp_path):
    run_dir = qlora_onnx_run(tiny_model, tmp_path)
    report = round_trip(run_dir, QdrantClient(":memory:"))
    assert report["client"].startswith("fastembed")
    assert report["points"] == 60
    assert report["tuned"] == pytest.approx(report["run"]["tuned"], abs=1e-3)


def test_adapter_queries_search_the_base_index_built_once(tiny_model, pairs_file, tmp_path):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path)
    raw["adapter"] = {"type": "linear"}
    raw["train"].update(epochs=30, lr=1e-2)
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    report = round_trip(run_dir, QdrantClient(":memory:"))
    assert report["collections"] == 1 and report["points"] == 60
    assert report["run"]["tuned"] != pytest.approx(report["run"]["base"], abs=1e-3)  # the check can tell them apart
    assert report["base"] == pytest.approx(report["run"]["base"], abs=1e-3)
    assert report["tuned"] == pytest.approx(report["run"]["tuned"], abs=1e-3)
