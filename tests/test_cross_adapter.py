"""Cross-model adapter (ERA) with two tiny encoders of different widths (64-d queries, 32-d documents)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOPICS, make_pairs
from sentence_transformers import SentenceTransformer

from finetune.cross.align import align_projection, mean_alignment_loss
from finetune.cross.config import AlignmentConfig
from finetune.cross.experiments import budget_experiments, leave_one_domain_out, per_domain
from finetune.cross.projection import Projection, load_projection
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.recipe import validate_recipe
from finetune.run import run_recipe
from finetune.splits import Splits


def _recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path, **sections):
    raw = {
        "kind": "cross_adapter",
        "name": "cross",
        "query_model": {"name": str(tiny_model_wide), "batch_size": 16},
        "document_model": {"name": str(tiny_model), "batch_size": 16},
        "data": {
            "path": str(pairs_file),
            "columns": {"query": "question", "positive": "answer", "id": "id", "domain": "category"},
        },
        "mode": ["both", "alignment_only", "label_only"],
        "train_ratios": [0.5, 1.0],
        "alignment": {"epochs": 10},
        "train": {"epochs": 3, "batch_size": 8},
        "cache": {"dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return validate_recipe(raw)


def _embed(folder, texts):
    return SentenceTransformer(str(folder), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True
    )


def test_projection_maps_query_width_to_document_width_normalised():
    for kind in ("linear", "mlp"):
        out = Projection(64, 32, kind, hidden_dim=48)(torch.randn(5, 64))
        assert out.shape == (5, 32)
        assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_alignment_reduces_the_alignment_loss(tiny_model, tiny_model_wide):
    texts = [r["question"] for r in make_pairs(60)] + [r["answer"] for r in make_pairs(60)]
    source, target = _embed(tiny_model_wide, texts), _embed(tiny_model, texts)
    projection = Projection(source.shape[1], target.shape[1])
    torch.manual_seed(0)
    history = align_projection(projection, source, target, AlignmentConfig(epochs=30, batch_size=32, lr=1e-2), seed=0)
    assert history[0]["loss"] == pytest.approx(mean_alignment_loss(Projection(64, 32), source, target), abs=0.5)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["loss"] == pytest.approx(mean_alignment_loss(projection, source, target))


def _domain_data() -> RetrievalData:
    rows = make_pairs(48)
    queries = {r["id"]: r["question"] for r in rows}
    queries["dup"] = rows[0]["question"]  # same text as faq-000, filed under another domain
    domains = {r["id"]: r["category"] for r in rows} | {"dup": TOPICS[1]}
    corpus = {f"d{r['id']}": r["answer"] for r in rows}
    relevant = {q: {f"d{q}"} for q in queries if q != "dup"} | {"dup": {"dfaq-000"}}
    return RetrievalData(queries, corpus, relevant, domains, source="toy")


def test_leave_one_domain_out_never_trains_on_the_held_out_domain():
    data = _domain_data()
    experiments = leave_one_domain_out(data, min_queries=4, val_fraction=0.2, seed=0)
    assert {e.domain for e in experiments} == set(TOPICS)
    for exp in experiments:
        held_out = exp.tests["held-out domain"]
        assert held_out and all(data.domains[q] == exp.domain for q in held_out)
        assert set(held_out) == {q for q in data.queries if data.domains[q] == exp.domain}
        seen = exp.train + exp.val + exp.unlabelled
        assert not [q for q in seen if data.domains[q] == exp.domain]
        assert not {data.queries[q] for q in seen} & {data.queries[q] for q in held_out}  # not even by identical text
    assert "dup" not in next(e for e in experiments if e.domain == TOPICS[0]).train


def test_per_domain_tests_inside_and_outside_its_domain():
    data = _domain_data()
    for exp in per_domain(data, min_queries=4, test_fraction=0.3, seed=0):
        inside, outside = exp.tests["in-domain"], exp.tests["other domains"]
        assert all(data.domains[q] == exp.domain for q in exp.train + inside)
        assert not set(exp.train) & set(inside) and all(data.domains[q] != exp.domain for q in outside)
        assert not {data.queries[q] for q in exp.train} & {data.queries[q] for q in inside + outside}


def test_label_budgets_are_nested_and_share_the_test_split():
    splits = Splits([f"t{i}" for i in range(50)], [f"v{i}" for i in range(10)], ["x1", "x2"])
    small, mid, full = budget_experiments(splits, [0.1, 0.4, 1.0], seed=3)
    assert (len(small.train), len(mid.train), len(full.train)) == (5, 20, 50)
    assert set(small.train) <= set(mid.train) <= set(full.train) and set(small.val) <= set(full.val)
    assert small.tests == full.tests == {"test": ["x1", "x2"]}
    assert small.unlabelled == full.unlabelled  # alignment may read every non-test query's text at any budget


def test_run_writes_summary_meta_projection_and_a_router_model_matching_the_toolkit(
    pairs_file, tiny_model, tiny_model_wide, tmp_path
):
    recipe = _recipe(
        pairs_file,
        tiny_model,
        tiny_model_wide,
        tmp_path,
        domains={"leave_one_domain_out": True, "min_queries": 4},
        negatives={"strategy": "mined", "per_query": 2, "range_max": 5},
    )
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dims"] == {"query_model": 64, "document_model": 32}
    assert metrics["exported"]["mode"] == "both" and metrics["exported"]["ratio"] == 1.0
    assert metrics["exported"]["alignment_loss"]["after"] < metrics["exported"]["alignment_loss"]["before"]
    assert metrics["trainable_parameters"] == 64 * 32 + 32 and metrics["document_embeddings_recomputed"] is False

    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    budget = {(r["model"], r["ratio"]) for r in rows if r["group"] == "budget"}
    for ratio in (0.5, 1.0):
        assert {
            (m, ratio) for m in ("small model alone", "large model alone", "both", "alignment_only", "label_only")
        } <= budget
    assert len({r["domain"] for r in rows if r["group"] == "lodo"}) == len(TOPICS)
    small = {(r["experiment"], r["test_set"]): r for r in rows if r["model"] == "small model alone"}
    for r in (r for r in rows if r["model"] in ("both", "alignment_only", "label_only")):  # paired to the small model
        vs, ref = r["vs_small"], small[(r["experiment"], r["test_set"])]
        assert vs["difference"] == pytest.approx(r["ndcg@10"] - ref["ndcg@10"], abs=1e-9) and vs["n"] == r["n_test"]
    assert (run_dir / "per_query.jsonl").is_file() and "significance" in metrics
    assert (run_dir / "budget.png").stat().st_size > 0 and "label_only" in (run_dir / "summary.md").read_text()

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["recipe"]["kind"] == "cross_adapter"
    splits = json.loads((run_dir / "splits.json").read_text())
    for exp in meta["experiments"]:
        if exp["group"] == "budget":
            assert exp["tests"]["test"] == splits["test"] and not set(exp["train"]) & set(splits["test"])

    # the exported folder, loaded by plain sentence-transformers, reproduces the toolkit's embeddings
    projection = load_projection(run_dir / "projection")
    assert projection.describe() == {"type": "linear", "d_in": 64, "d_out": 32, "hidden_dim": 1024}
    exported = SentenceTransformer(str(run_dir / "model"), device="cpu")
    queries = [r["question"] for r in make_pairs(10)]
    docs = [r["answer"] for r in make_pairs(10)]
    with torch.no_grad():
        ours_q = projection(_embed(tiny_model_wide, queries))
    assert torch.allclose(exported.encode_query(queries, convert_to_tensor=True), ours_q, atol=1e-5)
    assert torch.allclose(exported.encode_document(docs, convert_to_tensor=True), _embed(tiny_model, docs), atol=1e-5)
    assert max(metrics["export_max_abs_diff"].values()) < 1e-5


def test_mode_only_alignment_uses_no_labels_and_equal_budgets_agree(pairs_file, tiny_model, tiny_model_wide, tmp_path):
    recipe = _recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path, mode="alignment_only", train_ratios=[0.2, 1.0])
    rows = json.loads((run_recipe(recipe, echo=lambda *_: None) / "summary.json").read_text())["rows"]
    aligned = [r for r in rows if r["model"] == "alignment_only"]
    assert len(aligned) == 2 and aligned[0]["ndcg@10"] == aligned[1]["ndcg@10"] and aligned[0]["train_queries"] == 0


def test_bad_cross_recipes_fail_with_one_line(pairs_file, tiny_model, tiny_model_wide, tmp_path):
    with pytest.raises(FinetuneError, match=r"train_ratios: .*\(0, 1\]"):
        _recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path, train_ratios=[0.0, 0.5])
    with pytest.raises(FinetuneError, match="mode"):
        _recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path, mode=["both", "both"])
    no_domain = _recipe(
        pairs_file, tiny_model, tiny_model_wide, tmp_path, domains={"per_domain": True, "min_queries": 500}
    )
    with pytest.raises(FinetuneError, match="min_queries"):
        run_recipe(no_domain, echo=lambda *_: None)
    assert not (tmp_path / "runs").exists()  # checked before a run directory is made
    raw = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "cross_adapter.yaml").read_text())
    assert validate_recipe(raw).modes() == ["both", "alignment_only", "label_only"]
