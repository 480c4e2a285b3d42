"""Every run says where its time went, and ``train.eval_steps: auto`` validates once an epoch."""

import json

from conftest import adapter_recipe, qlora_recipe

from finetune.recipe import validate_recipe
from finetune.run import run_recipe
from finetune.stages import Stages, stage

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def test_time_goes_to_the_innermost_stage_and_the_shares_add_up():
    clock = Stages()
    with clock:
        with stage("training"):
            with stage("validation"):
                sum(range(200_000))
            sum(range(100_000))
        with stage("validation"):
            pass
    record = clock.record()
    assert record["validation"]["calls"] == 2 and record["training"]["calls"] == 1
    assert abs(sum(row["share"] for row in record.values()) - 1) < 1e-9
    assert record["training"]["seconds"] < clock.wall - record["validation"]["seconds"] + 1e-9


def test_outside_a_clock_a_stage_does_nothing():
    with stage("mining"):
        pass  # no clock is open: nothing to charge, and no error


def test_a_qlora_run_tabulates_its_stages_and_validates_once_an_epoch(tiny_model, pairs_file, tmp_path, capsys):
    raw = qlora_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    raw["train"].update(epochs=2, max_steps=-1, eval_steps="auto")  # 42 train rows / batch 8: 6 steps an epoch
    run = run_recipe(validate_recipe(raw), echo=print)
    metrics = json.loads((run / "metrics.json").read_text())

    evaluations = [e for e in metrics["log_history"] if "eval_val_cosine_ndcg@10" in e]
    assert [e["step"] for e in evaluations] == [6, 12] and [e["epoch"] for e in evaluations] == [1.0, 2.0]
    stages = metrics["stages"]
    assert stages["validation"]["calls"] == len(evaluations)
    assert stages["test evaluation"]["calls"] == 2  # base, exported
    assert stages["as-trained check"]["calls"] == 1  # the 4-bit model as trained, on the test candidates
    assert stages["encoding"]["calls"] == 2  # the corpus: by the base model, by the exported one
    assert {"load data", "splits", "set up", "training", "export", "significance"} <= set(stages)
    assert abs(sum(row["share"] for row in stages.values()) - 1) < 1e-6
    assert stages["training"]["seconds"] > 0 and stages["export"]["peak_rss_mb"] > 0
    assert "where the time went" in capsys.readouterr().out


def test_an_adapter_run_charges_its_encoding(tiny_model, pairs_file, tmp_path):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    run = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    assert stages["encoding"]["calls"] == 2  # corpus and queries, once each
    assert stages["validation"]["calls"] == 4  # the base model, then once an epoch
