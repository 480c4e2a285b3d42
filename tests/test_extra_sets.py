"""``eval.also``: extra retrieval sets scored base and tuned, over their full corpus and own test split."""

import json

import pytest
from conftest import COLUMNS_PAIRS, adapter_recipe, qlora_recipe, score_on_run_split, write_beir
from sentence_transformers import SentenceTransformer

from finetune.cli import main
from finetune.config import DataConfig, SplitConfig
from finetune.evaluation import build_evaluator, evaluate
from finetune.extra_sets import load_extra_sets
from finetune.recipe import validate_recipe
from finetune.run import run_recipe


@pytest.fixture
def beir_folder(tmp_path):
    return write_beir(tmp_path / "other", n=40)


def _plain_score(model_path, folder, seed=42) -> float:
    """NDCG@10 of plain ``SentenceTransformer(model_path)`` on the extra set's own test split."""
    extra = load_extra_sets([DataConfig(path=str(folder))], SplitConfig(), seed)[0]
    model = SentenceTransformer(str(model_path), device="cpu")
    return evaluate(build_evaluator(extra.data, extra.test, "x"), model)["ndcg@10"]


def test_adapter_scores_the_extra_set_base_and_tuned(pairs_file, tiny_model, beir_folder, tmp_path):
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    lines = []
    recipe = validate_recipe(adapter_recipe(data, tiny_model, tmp_path, eval={"also": [str(beir_folder)]}))
    run_dir = run_recipe(recipe, echo=lines.append)
    also = json.loads((run_dir / "metrics.json").read_text())["also"]["other"]
    assert also["n_corpus"] == 41 and also["base"]["ndcg@10"] == pytest.approx(_plain_score(tiny_model, beir_folder))
    exported = _plain_score(run_dir / "model", beir_folder)  # the adapter, as the exported model applies it
    assert also["tuned"]["ndcg@10"] == pytest.approx(exported, abs=1e-6)
    assert any(line.startswith("extra sets (eval.also)") for line in lines)


def test_qlora_scores_the_extra_set_on_the_checkpoint_and_the_exported_model(
    pairs_file, tiny_model, beir_folder, tmp_path
):
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    recipe = validate_recipe(qlora_recipe(data, tiny_model, tmp_path, steps=4, eval={"also": [str(beir_folder)]}))
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    also = metrics["also"]["other"]
    assert also["base"]["ndcg@10"] == pytest.approx(_plain_score(tiny_model, beir_folder), abs=1e-6)
    assert also["tuned"]["ndcg@10"] == pytest.approx(_plain_score(run_dir / "model", beir_folder), abs=1e-6)
    assert metrics["seconds"]["evaluate_also"] > 0


def test_an_extra_set_that_fails_to_load_names_its_entry_and_writes_nothing(
    pairs_file, tiny_model, beir_folder, tmp_path, capsys
):
    raw = adapter_recipe(
        {"path": str(pairs_file), "columns": COLUMNS_PAIRS},
        tiny_model,
        tmp_path,
        eval={"also": [str(beir_folder), str(tmp_path / "missing.jsonl")]},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # progress bars may come first
    assert len(lines) == 1 and "Traceback" not in err and "eval.also[1]" in lines[0] and "missing.jsonl" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_adapter_merge_scale_auto_chooses_on_validation_and_exports_the_choice(
    pairs_file, tiny_model, beir_folder, tmp_path
):
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    merge = {"scale": "auto", "grid": [0.0, 0.5, 1.0], "max_drop": 0.0}
    raw = adapter_recipe(data, tiny_model, tmp_path, eval={"also": [str(beir_folder)]}, merge=merge)
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    chosen, grid = metrics["merge"]["scale"], metrics["merge"]["grid"]
    assert [r["s"] for r in grid] == [0.0, 0.5, 1.0] and (run_dir / "merge.png").stat().st_size > 0
    base = grid[0]["other"]
    allowed = [r for r in grid if r["other"] >= base - 1e-12]  # max_drop 0: never below the base on the extra set
    assert chosen == max(allowed, key=lambda r: r["in_domain"])["s"]
    # the tuned row is the exported model, at the chosen s
    assert metrics["tuned"]["ndcg@10"] == pytest.approx(score_on_run_split(run_dir, run_dir / "model")["ndcg@10"])
    assert metrics["also"]["other"]["tuned"]["ndcg@10"] == pytest.approx(
        _plain_score(run_dir / "model", beir_folder), abs=1e-6
    )


def test_adapter_merge_scale_zero_is_the_base_model(pairs_file, tiny_model, tmp_path):
    """s = 0 scales the adapter's residual away: the tuned row is the base row, and the export the base model."""
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, merge={"scale": 0})
    raw["train"].update(lr=3e-2, epochs=8)
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge"]["scale"] == 0.0 and metrics["tuned"] == pytest.approx(metrics["base"], abs=1e-6)
    assert metrics["merge"]["test_at_scale_1"]["in_domain"] != pytest.approx(metrics["base"]["ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_qlora_merge_scale_zero_gives_back_the_checkpoint(pairs_file, tiny_model, tmp_path, method):
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    extra = {} if method == "lora" else {"method": "full", "quantization": "none"}
    raw = qlora_recipe(data, tiny_model, tmp_path, steps=4, merge={"scale": 0.0}, **extra)
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge"]["scale"] == 0.0
    plain, exported = (SentenceTransformer(str(p), device="cpu") for p in (tiny_model, run_dir / "model"))
    texts = ["a query about roofs", "another one"]
    assert (
        plain.encode(texts, convert_to_tensor=True) - exported.encode(texts, convert_to_tensor=True)
    ).abs().max() < 1e-4


@pytest.mark.parametrize(
    "merge, message",
    [
        ({"max_drop": 0.01, "scale": "auto"}, "merge.max_drop limits the drop on eval.also sets"),
        ({"scale": 2.0}, r"scale must be in \[0, 1.5\]"),
        ({"scale": "auto", "grid": [0.5, 1.6]}, r"values of s in \[0, 1.5\]"),
        ({"grid": [0, 1]}, "merge.grid=.* has no effect unless merge.scale is auto"),
    ],
)
def test_bad_merge_settings_fail_with_one_line(pairs_file, tiny_model, tmp_path, merge, message):
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=message):
        validate_recipe(
            adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, merge=merge)
        )


@pytest.mark.parametrize("grid", [[0.0, 1.0], [1.0]])
def test_qlora_merge_scale_auto_scores_the_grid_with_rescaled_lora(
    pairs_file, tiny_model, beir_folder, tmp_path, grid
):
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    merge = {"scale": "auto", "grid": grid}
    raw = qlora_recipe(data, tiny_model, tmp_path, steps=4, merge=merge, eval={"also": [str(beir_folder)]})
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    merge = metrics["merge"]
    rows = {r["s"]: r for r in merge["grid"]}
    # the grid scores the model that is exported (full-precision checkpoint + s x LoRA delta), not the
    # 4-bit training model: s = 0 is the checkpoint itself, and the chosen s is model/ on validation
    extra = load_extra_sets([DataConfig(path=str(beir_folder))], SplitConfig(), 42)[0]
    plain, exported = (SentenceTransformer(str(p), device="cpu") for p in (tiny_model, run_dir / "model"))
    val = load_extra_sets([DataConfig(**data)], SplitConfig(), 42)[0]
    if 0.0 in rows:
        assert rows[0.0]["other"] == pytest.approx(
            evaluate(build_evaluator(extra.data, extra.val, "v"), plain)["ndcg@10"]
        )
    assert rows[merge["scale"]]["in_domain"] == pytest.approx(
        evaluate(build_evaluator(val.data, val.val, "v"), exported)["ndcg@10"], abs=1e-6
    )
    assert (
        merge["scale"] == max((r for r in merge["grid"] if r["s"] in grid), key=lambda r: r["in_domain"])["s"]
        and (run_dir / "merge.png").is_file()
    )
    # s = 1 on test is recorded after the choice, for reference; at s = 1 it is the tuned row itself
    assert set(merge["test_at_scale_1"]) == {"in_domain", "other"}
    assert metrics["tuned"]["ndcg@10"] == pytest.approx(score_on_run_split(run_dir, run_dir / "model")["ndcg@10"])
    if grid == [1.0]:  # s = 1 is the only choice
        assert merge["test_at_scale_1"]["in_domain"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-6)


def test_compare_adds_a_column_per_extra_set(pairs_file, tiny_model, beir_folder, tmp_path):
    from finetune.compare import comparison_rows, markdown_table

    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    raw = adapter_recipe(data, tiny_model, tmp_path, eval={"also": [str(beir_folder)]})
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    also = json.loads((run_dir / "metrics.json").read_text())["also"]["other"]
    table = markdown_table(comparison_rows([run_dir]), 15, 60)
    assert "NDCG@10 other (eval.also)" in table.splitlines()[2]
    assert f"{also['base']['ndcg@10']:.4f} |" in table.splitlines()[4]  # the base row
    assert f"{also['tuned']['ndcg@10']:.4f} |" in table.splitlines()[5]  # the run's row


def test_nanobeir_without_the_hub_stops_at_once_with_one_line(monkeypatch):
    from finetune.data import nanobeir
    from finetune.errors import FinetuneError

    monkeypatch.setattr(nanobeir, "hub_unreachable", lambda: "huggingface.co: Name or service not known")
    with pytest.raises(
        FinetuneError, match=r"eval.also\[0\] nanobeir:scifact: NanoBEIR is read from the Hugging Face Hub"
    ):
        load_extra_sets([DataConfig(path="nanobeir:scifact")], SplitConfig(), 0)
    with pytest.raises(FinetuneError, match=r"eval.also\[0\] nanobeir:scifacts: 'scifacts' is not a NanoBEIR set"):
        load_extra_sets([DataConfig(path="nanobeir:scifacts")], SplitConfig(), 0)


def test_nanobeir_offline_mode_without_the_sets_cached_says_the_hub_is_needed(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from finetune.errors import FinetuneError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(FinetuneError, match=r"eval.also\[0\] nanobeir:nfcorpus: NanoBEIR is read from the Hugging"):
        load_extra_sets([DataConfig(path="nanobeir:nfcorpus")], SplitConfig(), 0)


def _fake_hub(monkeypatch, beir_folder):
    """The Hub as NanoBEIREvaluator reads it (datasets.load_dataset), serving one small BEIR set."""
    import datasets

    from finetune.data import nanobeir

    extra = load_extra_sets([DataConfig(path=str(beir_folder))], SplitConfig(), 42)[0].data
    subsets = {
        "corpus": [{"_id": d, "text": t} for d, t in extra.corpus.items()],
        "queries": [{"_id": q, "text": t} for q, t in extra.queries.items()],
        "qrels": [{"query-id": q, "corpus-id": d} for q, ds in extra.relevant.items() for d in sorted(ds)],
    }
    asked = []

    def load_dataset(path, name, split):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(subsets[name])

    monkeypatch.setattr(nanobeir, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return extra, asked


def test_nanobeir_sets_come_through_the_nanobeir_evaluator_and_are_all_test(
    monkeypatch, pairs_file, tiny_model, beir_folder, tmp_path
):
    extra, asked = _fake_hub(monkeypatch, beir_folder)
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    recipe = validate_recipe(adapter_recipe(data, tiny_model, tmp_path, eval={"also": ["nanobeir:scifact"]}))
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    assert ("sentence-transformers/NanoBEIR-en", "queries", "NanoSciFact") in asked
    also = json.loads((run_dir / "metrics.json").read_text())["also"]["NanoSciFact"]
    assert also["n_test"] == len(extra.queries) and also["n_corpus"] == len(extra.corpus)
    plain = SentenceTransformer(str(tiny_model), device="cpu")
    assert also["base"]["ndcg@10"] == pytest.approx(
        evaluate(build_evaluator(extra, list(extra.queries), "x"), plain)["ndcg@10"], abs=1e-6
    )


def test_merge_max_drop_refuses_nanobeir_which_has_no_validation_queries(
    monkeypatch, pairs_file, tiny_model, beir_folder, tmp_path
):
    from finetune.errors import FinetuneError

    _fake_hub(monkeypatch, beir_folder)
    data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
    merge = {"scale": "auto", "max_drop": 0.01}
    raw = adapter_recipe(data, tiny_model, tmp_path, eval={"also": ["nanobeir:scifact"]}, merge=merge)
    with pytest.raises(FinetuneError, match="NanoSciFact has no validation queries"):
        run_recipe(validate_recipe(raw), echo=lambda *_: None)
    assert not (tmp_path / "runs").exists()
