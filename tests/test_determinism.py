"""The same recipe and seed give the same splits and the same metrics on CPU, for both families."""

import json

import pytest
import yaml
from conftest import adapter_recipe

from finetune.cli import main

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _twice(tmp_path, raw: dict) -> tuple[dict, dict, dict, dict]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in ("a", "b"):
        assert main(["run", str(path), "--run-dir", str(tmp_path / name)]) == 0
    load = lambda d, f: json.loads((tmp_path / d / f).read_text())  # noqa: E731
    return load("a", "splits.json"), load("b", "splits.json"), load("a", "metrics.json"), load("b", "metrics.json")


def test_adapter_same_seed_same_splits_and_metrics(tmp_path, tiny_model, pairs_file):
    raw = adapter_recipe(
        {"path": str(pairs_file), "columns": COLUMNS},
        tiny_model,
        tmp_path,
        negatives={"strategy": "mined", "per_query": 2},
    )
    raw["adapter"] = {"type": "mlp", "hidden_dim": 64, "dropout": 0.1}  # dropout draws from the global RNG too
    split_a, split_b, a, b = _twice(tmp_path, raw)
    assert split_a == split_b
    assert a["history"] == b["history"] and a["tuned"] == b["tuned"] and a["base"] == b["base"]


def test_qlora_same_seed_same_splits_and_metrics(tmp_path, tiny_model, pairs_file):
    raw = {
        "kind": "qlora",
        "name": "q",
        "model": {"name": str(tiny_model), "batch_size": 16},
        "data": {"path": str(pairs_file), "columns": COLUMNS},
        "lora": {"dropout": 0.1},
        "train": {"epochs": 100, "max_steps": 8, "batch_size": 8, "lr": 5e-3, "eval_steps": 4, "warmup_ratio": 0.0},
        "output": {"dir": str(tmp_path / "runs")},
    }
    split_a, split_b, a, b = _twice(tmp_path, raw)
    assert split_a == split_b
    assert a["tuned"] == pytest.approx(b["tuned"], abs=1e-6) and a["train_loss"] == pytest.approx(
        b["train_loss"], abs=1e-6
    )


def test_a_different_seed_gives_different_splits(tmp_path, tiny_model, pairs_file):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0
    for seed in ("1", "2"):
        assert main(["run", str(path), f"seed={seed}", "--run-dir", str(tmp_path / seed)]) == 0
    one, two = (json.loads((tmp_path / s / "splits.json").read_text()) for s in "12")
    assert one["test"] != two["test"]
