"""ONNX export: the graph computes what the PyTorch model computes (its pooling, Dense head and normalisation),
in sentence-transformers' layout, and a kind or stack that cannot be exported is refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import qlora_onnx_run

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.onnx_export import FILES, OnnxEncoder, export_onnx, why_not_exportable

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEXTS = ["how do I build a fence", "a permit is needed for " * 12, "x", "solar panels on the roof of a shed"]


@pytest.fixture(scope="module")
def headed_model(tiny_model, tmp_path_factory):
    """The tiny encoder with a Dense head (32 -> 16, tanh) before Normalize: pooling, head and norm all count."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    base = SentenceTransformer(str(tiny_model), device="cpu")
    modules = [m for m in base.children() if not isinstance(m, Normalize)]
    model = SentenceTransformer(modules=[*modules, Dense(32, 16), Normalize()], device="cpu")
    folder = tmp_path_factory.mktemp("headed") / "model"
    model.save(str(folder))
    return model, folder


def test_the_graph_computes_the_models_embeddings(headed_model):
    model, folder = headed_model
    record = export_onnx(model, folder, TEXTS)
    assert record["fp32_min_cosine"] >= 0.9999
    assert (folder / FILES["fp32"]).is_file() and (folder / FILES["int8"]).is_file()
    expected = model.encode(TEXTS[::-1] * 5, convert_to_numpy=True)  # other batch shapes than the traced one
    got = OnnxEncoder(folder, "fp32").encode(TEXTS[::-1] * 5, batch_size=3)
    assert got.shape == (20, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    int8 = OnnxEncoder(folder, "int8").encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-5)  # the model's Normalize is in the graph
    assert 0.9 < float((int8 * model.encode(TEXTS)).sum(1).min()) < 0.99999  # quantized: close, not equal


def test_a_router_model_is_refused_with_the_reason(tiny_model):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Router

    base = SentenceTransformer(str(tiny_model), device="cpu")
    router = Router.for_query_document(query_modules=list(base.children()), document_modules=[Normalize()])
    assert "Router" in why_not_exportable(SentenceTransformer(modules=[router], device="cpu"))
    with pytest.raises(FinetuneError, match="cannot export to ONNX: its queries and documents"):
        export_onnx(SentenceTransformer(modules=[router], device="cpu"), tiny_model.parent / "unused", TEXTS)


def test_a_qlora_run_writes_and_checks_onnx(tiny_model, tmp_path):
    lines = []
    run_dir = qlora_onnx_run(tiny_model, tmp_path, echo=lines.append)
    record = json.loads((run_dir / "metrics.json").read_text())["export"]["onnx"]
    assert record["fp32_min_cosine"] >= 0.999
    assert record["documents"] == 60 and 0 < record["int8_ndcg@10"] <= 1
    # the PyTorch figure on the whole corpus is the run's own tuned row
    tuned = json.loads((run_dir / "metrics.json").read_text())["tuned"]["ndcg@10"]
    assert record["pytorch_ndcg@10"] == pytest.approx(tuned, abs=1e-6)
    assert any(str(line).startswith("onnx: model/onnx/model.onnx") for line in lines)
    assert f"int8: test NDCG@10 {record['int8_ndcg@10']:.4f}" in (run_dir / "model" / "README.md").read_text()


@pytest.mark.parametrize("kind", ["adapter", "cross_adapter"])
def test_onnx_on_a_routed_kind_is_refused_before_anything_is_written(kind, tmp_path, capsys):
    code = main(["validate", str(RECIPES / f"{kind}.yaml"), "export.onnx=true", f"output.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "export: unknown field" in err and "ONNX export takes one encoder stack" in err and "a Router" in err
    assert not any(tmp_path.iterdir())


def test_a_graph_that_fails_its_check_leaves_the_runs_other_outputs(tiny_model, tmp_path, monkeypatch):
    """The fp32 check cannot pass (a bar above cosine 1): one line says why, model/ and metrics.json stay."""
    monkeypatch.setattr("finetune.onnx_export.MIN_COSINE", 1.5)
    lines = []
    run_dir = qlora_onnx_run(tiny_model, tmp_path, steps=2, echo=lines.append)
    record = json.loads((run_dir / "metrics.json").read_text())["export"]["onnx"]
    assert "differ from PyTorch's" in record["error"]
    assert not (run_dir / "model" / "onnx").exists() and not (run_dir / "model" / "onnx.partial").exists()
    assert (run_dir / "model" / "README.md").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    said = [str(line) for line in lines if str(line).startswith("onnx: not written (")]
    assert len(said) == 1 and "differ from PyTorch's" in said[0] and "\n" not in said[0]


def test_export_adds_onnx_to_a_finished_run_and_its_card(tiny_model, tmp_path, capsys):
    from conftest import COLUMNS_PAIRS, make_pairs, qlora_recipe

    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(60)))
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, steps=2)
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    assert not (run_dir / "model" / "onnx").exists()
    assert main(["export", str(run_dir), "--onnx"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = metrics["export"]["onnx"]
    assert (run_dir / "model" / FILES["int8"]).is_file() and record["fp32_min_cosine"] >= 0.999
    assert record["pytorch_ndcg@10"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-6)  # whole corpus
    assert f"int8: test NDCG@10 {record['int8_ndcg@10']:.4f}" in (run_dir / "model" / "README.md").read_text()
    assert "onnx: model/onnx/model.onnx" in capsys.readouterr().out


def test_export_refuses_a_routed_model_and_an_unfinished_run(tiny_model, pairs_file, tmp_path, capsys):
    from conftest import COLUMNS_PAIRS, adapter_recipe

    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    run_dir = run_recipe(validate_recipe(adapter_recipe(
        {"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path)), echo=lambda *_: None)  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(run_dir), "--onnx"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a Router" in errors[0] and not (run_dir / "model" / "onnx").exists()
    (tmp_path / "unfinished").mkdir()
    assert main(["export", str(tmp_path / "unfinished"), "--onnx"]) == 2
    assert "not a finished run" in capsys.readouterr().err
