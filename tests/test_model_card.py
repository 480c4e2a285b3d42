"""The exported ``model/README.md`` is the run's own card: the run's data and numbers, the base checkpoint's
license and language, and nothing of the base card's own training data."""

import json
import re
import shutil

import pytest
import yaml
from conftest import COLUMNS_PAIRS, adapter_recipe, make_pairs, qlora_recipe

from finetune.evaluation import HEADLINE
from finetune.recipe import validate_recipe
from finetune.run import run_recipe

BASE_CARD = """---
language: sv
license: mit
datasets:
- s2orc
- ms_marco
---

# tiny-base-card

Trained on s2orc and ms_marco, 1B sentence pairs.
"""


@pytest.fixture(scope="module")
def carded_model(tiny_model, tmp_path_factory):
    """The tiny model with a card of its own, as a Hub checkpoint has."""
    folder = tmp_path_factory.mktemp("carded") / "base"
    shutil.copytree(tiny_model, folder)
    (folder / "README.md").write_text(BASE_CARD)
    return folder


def _card(run_dir):
    text = (run_dir / "model" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---", 2)[1])
    return text, meta, json.loads((run_dir / "metrics.json").read_text())


def _assert_run_card(text: str, meta: dict, metrics: dict) -> None:
    """The card names the run's data and numbers, the base's license and language, none of its training data."""
    assert meta["license"] == "mit" and meta["language"] == ["sv"]
    assert "s2orc" not in text and "ms_marco" not in text and "tiny-base-card" not in text
    assert "pairs" in meta["model-index"][0]["results"][0]["dataset"]["name"]
    reported = {r["type"].removeprefix("cosine_"): r["value"] for r in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported == pytest.approx({m: metrics["tuned"][m] for m in HEADLINE})
    ndcg = metrics["significance"]["ndcg@10"]
    row = f"| ndcg@10 | {metrics['base']['ndcg@10']:.4f} | {metrics['tuned']['ndcg@10']:.4f} |"
    assert row in text
    assert f"[{ndcg['ci_low']:+.4f}, {ndcg['ci_high']:+.4f}]" in text
    assert f"test {metrics['splits']['test']:,}" in text and f"{metrics['n_corpus']:,} documents" in text
    assert "encode_query" in text and "encode_document" in text
    stored = metrics["precision"]
    assert f"| int8 | {stored['base']['int8']:.4f} | {stored['tuned']['int8']:.4f} |" in text


def test_qlora_card_is_the_runs_own(carded_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(60)))
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS_PAIRS}, carded_model, tmp_path, steps=8)
    raw["lora"] = {"r": 4, "alpha": 8}
    raw["train"]["lr"] = 3e-2  # far enough that tuned differs from base: a swapped table would show
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    text, meta, metrics = _card(run_dir)
    _assert_run_card(text, meta, metrics)
    assert "QLoRA" in text and "r 4, alpha 8" in text
    assert metrics["tuned"]["ndcg@10"] != metrics["base"]["ndcg@10"]
    assert "`query`, `value`" in text  # the LoRA target layers (BERT: query, key, value, dense)
    assert "re-index your documents" in text
    assert re.search(r"\| [\d.]+\s+\| 8\s+\| [\d.]+\s+\|", text)  # the validation log: step 8


def test_adapter_card_says_only_the_query_side_changed(carded_model, pairs_file, tmp_path):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, carded_model, tmp_path)
    raw["model"]["query_prompt"] = "find: "
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    text, meta, metrics = _card(run_dir)
    _assert_run_card(text, meta, metrics)
    assert "Only the query side changed" in text and "stays valid" in text
    assert "`encode_query` prepends 'find: '" in text  # the prompt the usage snippet applies, spelled out
