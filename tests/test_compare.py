import json

import pytest
import yaml
from conftest import adapter_recipe

from finetune.cli import main

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


@pytest.fixture
def recipe_files(tiny_model, pairs_file, tmp_path):
    data = {"path": str(pairs_file), "columns": COLUMNS}
    adapter = tmp_path / "adapter.yaml"
    adapter.write_text(yaml.safe_dump(adapter_recipe(data, tiny_model, tmp_path, name="ad")))
    qlora = tmp_path / "qlora.yaml"
    qlora.write_text(
        yaml.safe_dump(
            {
                "kind": "qlora",
                "name": "ql",
                "model": {"name": str(tiny_model), "batch_size": 16},
                "data": data,
                "train": {"max_steps": 2, "batch_size": 8, "eval_steps": 1000},
                "output": {"dir": str(tmp_path / "runs")},
            }
        )
    )
    return adapter, qlora


def test_compare_runs_recipes_on_one_split_and_writes_table_json_and_chart(recipe_files, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, recipe_files), "--out", str(out)]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name.split("-")[0] for r in runs] == ["ad", "ql"]
    tests = [json.loads((r / "splits.json").read_text())["test"] for r in runs]
    assert tests[0] == tests[1]
    # the second recipe was handed the first run's splits file
    assert f"splits.file={runs[0] / 'splits.json'}" in (runs[1] / "command.txt").read_text()

    table = (out / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 3 and rows[0].startswith("| base (") and "| ad |" in table and "| ql (lora, nf4) |" in table
    assert "| no |" in table and "| yes |" in table  # documents re-embedded: adapter no, qlora yes
    result = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in result["rows"]][1:] == ["ad", "ql (lora, nf4)"]
    ad = result["rows"][1]
    assert ad["ndcg@10"] == json.loads((runs[0] / "metrics.json").read_text())["tuned"]["ndcg@10"]
    assert ad["trainable_parameters"] > 0 and ad["peak_rss_mb"] > 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second compare reuses both finished runs: nothing new is trained
    capsys.readouterr()
    assert main(["compare", *map(str, recipe_files), "--out", str(out)]) == 0
    assert sorted((tmp_path / "runs").iterdir()) == runs
    assert capsys.readouterr().out.count("reusing") == 2
    # the same query ids in a splits file at another path are the same splits: still reused
    copy = tmp_path / "copy.json"
    copy.write_text((runs[0] / "splits.json").read_text())
    assert main(["compare", *map(str, recipe_files), "--splits", str(copy), "--out", str(out)]) == 0
    assert sorted((tmp_path / "runs").iterdir()) == runs
    assert capsys.readouterr().out.count("reusing") == 2


def test_compare_reads_run_directories_and_refuses_different_test_queries(recipe_files, tmp_path, capsys):
    adapter, _ = recipe_files
    assert main(["run", str(adapter)]) == 0
    assert main(["run", str(adapter), "name=other", "seed=7"]) == 0  # another seed: other test queries
    first, other = sorted((tmp_path / "runs").iterdir())
    assert main(["compare", str(first), "--out", str(tmp_path / "one")]) == 0
    assert main(["compare", str(first), str(other), "--out", str(tmp_path / "two")]) == 2
    assert "test queries differ" in capsys.readouterr().err
    assert not (tmp_path / "two").exists()


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
