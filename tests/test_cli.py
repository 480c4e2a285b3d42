import json
from pathlib import Path

import pytest
import yaml
from conftest import adapter_recipe, score_on_run_split

from finetune.cli import main

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _recipe(tmp_path, raw) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("# python -m finetune run recipe.yaml\n" + yaml.safe_dump(raw))
    return str(path)


def test_run_writes_a_complete_run_directory_and_reuses_the_cache(tmp_path, tiny_model, pairs_file, capsys):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    recipe = _recipe(tmp_path, raw)
    assert main(["run", recipe]) == 0
    out = capsys.readouterr().out
    assert "ndcg@10" in out and "base" in out and "tuned" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    files = {p.name for p in run_dir.iterdir()}
    assert {"recipe.yaml", "splits.json", "metrics.json", "versions.json", "command.txt", "adapter", "model"} <= files
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the base row is the checkpoint as plain sentence-transformers loads it; the tuned row is the exported model
    assert metrics["base"]["ndcg@10"] == pytest.approx(score_on_run_split(run_dir, tiny_model)["ndcg@10"], abs=1e-6)
    assert metrics["tuned"]["ndcg@10"] == pytest.approx(
        score_on_run_split(run_dir, run_dir / "model")["ndcg@10"], abs=1e-4
    )
    assert metrics["document_embeddings_recomputed"] is False
    assert metrics["export_max_abs_diff"] < 1e-4
    splits = json.loads((run_dir / "splits.json").read_text())
    assert len(splits["test"]) == metrics["splits"]["test"] == 12
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["epochs"] == 3  # resolved, defaults filled
    assert "torch" in json.loads((run_dir / "versions.json").read_text())

    assert main(["run", recipe, "name=again"]) == 0
    assert "2 hit(s), 0 miss(es)" in capsys.readouterr().out
    assert main(["run", recipe, "name=forced", "--force-recache"]) == 0
    assert "0 hit(s), 2 miss(es)" in capsys.readouterr().out


def test_two_recipes_share_one_splits_file(tmp_path, tiny_model, pairs_file):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    assert main(["run", _recipe(tmp_path, raw), "name=first"]) == 0
    (first,) = (tmp_path / "runs").iterdir()
    shared = str(first / "splits.json")
    assert (
        main(["run", _recipe(tmp_path, raw), "name=second", "adapter.type=mlp", "seed=7", f"splits.file={shared}"])
        == 0
    )
    (second,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("second")]
    a, b = (json.loads((d / "splits.json").read_text()) for d in (first, second))
    assert a["test"] == b["test"] and a["train"] == b["train"]


def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, tiny_model, pairs_file, capsys):
    raw = adapter_recipe({"path": str(pairs_file), "columns": dict(COLUMNS, query="qestion")}, tiny_model, tmp_path)
    assert main(["run", _recipe(tmp_path, raw)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'question'" in err and "pairs.jsonl" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_model_names_the_fix(tmp_path, pairs_file, capsys):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tmp_path, tmp_path)
    raw["model"] = {"name": "nobody/no-such-model"}
    assert main(["run", _recipe(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "model.name nobody/no-such-model" in err and "not found" in err
    assert not (tmp_path / "runs").exists()


def test_validate(tmp_path, tiny_model, pairs_file, capsys):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    assert main(["validate", _recipe(tmp_path, raw)]) == 0
    out = capsys.readouterr().out
    assert "recipe OK" in out and "data OK" in out and "model OK" in out
    assert main(["validate", _recipe(tmp_path, raw), "train.epochz=1"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["python -m finetune", "finetune"])
def test_console_entry_points_exist(module):
    import shutil
    import subprocess
    import sys

    script = shutil.which("finetune", path=str(Path(sys.executable).parent)) or shutil.which("finetune") or "finetune"
    cmd = [sys.executable, "-m", "finetune", "--help"] if module.startswith("python") else [script, "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "run" in result.stdout and "validate" in result.stdout
