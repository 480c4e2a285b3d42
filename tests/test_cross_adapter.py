"""Cross-model adapter with two tiny encoders of different widths (64-d queries, 32-d documents)."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOPICS, make_pairs
from fake_openai import FakeOpenAI
from sentence_transformers import SentenceTransformer

from finetune.cross.align import align_projection, mean_alignment_loss, score_map
from finetune.cross.config import AlignmentConfig
from finetune.cross.experiments import budget_experiments, leave_one_domain_out, per_domain
from finetune.cross.projection import Projection, load_projection, save_projection
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
        "alignment": {"objective": ["scores", "identical_text"], "epochs": 10},
        "train": {"epochs": 3, "batch_size": 8},
        "cache": {"dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return validate_recipe(raw)


@pytest.fixture
def cross_recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path):
    """``cross_recipe(**sections)``: the tiny two-encoder recipe with some sections replaced."""
    return lambda **sections: _recipe(pairs_file, tiny_model, tiny_model_wide, tmp_path, **sections)


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
    untrained = copy.deepcopy(projection)
    torch.manual_seed(0)
    history = align_projection(projection, source, target, AlignmentConfig(epochs=30, batch_size=32, lr=1e-2), seed=0)
    assert history[0]["loss"] == pytest.approx(mean_alignment_loss(untrained, source, target), abs=1e-6)
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
    cross_recipe, tiny_model, tiny_model_wide
):
    recipe = cross_recipe(
        domains={"leave_one_domain_out": True, "min_queries": 4},
        negatives={"strategy": "mined", "per_query": 2, "range_max": 5},
    )
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dims"] == {"query_model": 64, "document_model": 32} and metrics["input"] == "both"
    grid = next(r for r in json.loads((run_dir / "summary.json").read_text())["rows"] if "both (scores)" == r["model"])
    assert grid["chosen"]["ridge"] in (1e-4, 1e-3, 1e-2, 1e-1) and grid["chosen"]["mix"] in (0, 0.25, 0.5, 0.75, 1)
    exported = metrics["exported"]
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    at_full = [r for r in rows if r["group"] == "budget" and r["ratio"] == 1.0 and "alone" not in r["model"]]
    assert exported["method"] == max(at_full, key=lambda r: r["val_ndcg@10"])["model"]  # chosen on validation
    assert exported["ratio"] == 1.0 and exported["chosen_on"] == "validation NDCG@10"
    assert metrics["trainable_parameters"] == 64 * 32 + 32 and metrics["document_embeddings_recomputed"] is False

    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    budget = {(r["model"], r["ratio"]) for r in rows if r["group"] == "budget"}
    methods = [f"{m} ({o})" for m in ("both", "alignment_only") for o in ("scores", "identical_text")] + ["label_only"]
    for ratio in (0.5, 1.0):
        assert {(m, ratio) for m in ("small model alone", "large model alone", *methods)} <= budget
    assert len({r["domain"] for r in rows if r["group"] == "lodo"}) == len(TOPICS)
    small = {(r["experiment"], r["test_set"]): r for r in rows if r["model"] == "small model alone"}
    for r in (r for r in rows if r["model"] in methods):  # paired to the small model
        vs, ref = r["vs_small"], small[(r["experiment"], r["test_set"])]
        assert vs["difference"] == pytest.approx(r["ndcg@10"] - ref["ndcg@10"], abs=1e-9) and vs["n"] == r["n_test"]
    assert (run_dir / "per_query.jsonl").is_file() and "significance" in metrics
    # the stage table books choosing (ridge x mix points, each cell's validation) as validation: a test scoring
    # makes a summary row (the models alone once per test set), so there are no more of them than rows
    stages = metrics["stages"]
    assert stages["validation"]["calls"] > 0 and stages["test evaluation"]["calls"] <= len(rows)
    summary = (run_dir / "summary.md").read_text()
    assert (run_dir / "budget.png").stat().st_size > 0 and "label_only" in summary
    assert summary.strip().splitlines()[-1].startswith(("Use ", "Keep the small model alone"))

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["recipe"]["kind"] == "cross_adapter"
    splits = json.loads((run_dir / "splits.json").read_text())
    for exp in meta["experiments"]:
        if exp["group"] == "budget":
            assert exp["tests"]["test"] == splits["test"] and not set(exp["train"]) & set(splits["test"])

    # the exported folder, loaded by sentence-transformers, reproduces the toolkit's embeddings; its query route
    # holds both encoders in one module of this package, which sentence-transformers imports only when trusted
    projection = load_projection(run_dir / "projection")
    assert projection.describe()["input"] == "both" and projection.width == 64 + 32
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(run_dir / "model"), device="cpu")
    model = SentenceTransformer(str(run_dir / "model"), device="cpu", trust_remote_code=True)
    queries = [r["question"] for r in make_pairs(10)]
    docs = [r["answer"] for r in make_pairs(10)]
    with torch.no_grad():
        ours_q = projection(torch.cat([_embed(tiny_model_wide, queries), _embed(tiny_model, queries)], dim=1))
    assert torch.allclose(model.encode_query(queries, convert_to_tensor=True), ours_q, atol=1e-5)
    assert torch.allclose(model.encode_document(docs, convert_to_tensor=True), _embed(tiny_model, docs), atol=1e-5)
    assert max(metrics["export_max_abs_diff"].values()) < 1e-5


def test_era_form_exports_plain_sentence_transformers_modules(cross_recipe, tiny_model_wide):
    recipe = cross_recipe(
        projection={"input": "large"},
        mode="both",
        alignment={"objective": "identical_text", "epochs": 10},
        train_ratios=[1.0],
    )
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    loss = metrics["exported"]["alignment"]["alignment_loss"]
    assert loss["after"] < loss["before"] and "mix" not in metrics["exported"]["alignment"]
    types = json.dumps(json.loads((run_dir / "model" / "router_config.json").read_text())["types"])
    assert "finetune" not in types  # ERA's export needs nothing but sentence-transformers
    queries = [r["question"] for r in make_pairs(5)]
    with torch.no_grad():
        ours = load_projection(run_dir / "projection")(_embed(tiny_model_wide, queries))
    theirs = SentenceTransformer(str(run_dir / "model"), device="cpu").encode_query(queries, convert_to_tensor=True)
    assert torch.allclose(theirs, ours, atol=1e-5)

    # projection.init: label training starts where the saved projection is (epoch 0 = its validation score)
    again = recipe.model_copy(update={"name": "again", "mode": "label_only"})
    again.projection.init, again.alignment = str(run_dir / "projection"), type(recipe.alignment)()
    history = json.loads((run_recipe(again, echo=lambda *_: None) / "metrics.json").read_text())["exported"]["history"]
    assert history[0]["val_ndcg@10"] == pytest.approx(max(h["val_ndcg@10"] for h in metrics["exported"]["history"]))


def test_alignment_fits_no_label_and_the_small_model_is_always_a_candidate(cross_recipe):
    recipe = cross_recipe(
        mode=["alignment_only", "label_only"],
        alignment={"objective": "scores"},
        train_ratios=[0.2, 1.0],
        domains={"per_domain": True, "min_queries": 4},
    )
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    # one domain's few queries leave no validation: label training has no epoch to prefer, so the small model stays
    small = {(r["experiment"], r["test_set"]): r["ndcg@10"] for r in rows if r["model"] == "small model alone"}
    per_domain = [r for r in rows if r["group"] == "per_domain" and r["model"] == "label_only"]
    assert per_domain and all(r["ndcg@10"] == small[(r["experiment"], r["test_set"])] for r in per_domain)
    aligned = [r for r in rows if r["model"] == "alignment_only" and r["group"] == "budget"]
    assert len(aligned) == 2 and all(r["train_queries"] == 0 for r in aligned)
    assert [r["chosen"]["selection_queries"] for r in aligned] == [r["labelled"] for r in aligned]
    chosen = json.loads((run_dir / "metrics.json").read_text())["exported"]["alignment"]
    small = {g["ndcg@10"] for g in chosen["grid"] if g["mix"] == 0}
    assert len(small) == 1  # mix 0 is the small model alone, whatever the ridge
    assert chosen["selection_ndcg@10"] >= small.pop() and chosen["selection_ndcg@10"] == max(
        g["ndcg@10"] for g in chosen["grid"]
    )


def test_input_both_starts_at_the_small_model_and_mixes_towards_the_map():
    q_large, q_small = torch.randn(6, 64), torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    fresh = Projection(64, 32, input="both")
    assert torch.allclose(fresh(torch.cat([q_large, q_small], 1)), q_small, atol=1e-6)
    era = Projection(64, 32)
    assert torch.allclose(era.mixed(0.0, q_large)(torch.cat([q_large, q_small], 1)), q_small, atol=1e-6)
    assert torch.allclose(era.mixed(1.0, q_large)(torch.cat([q_large, q_small], 1)), era(q_large), atol=1e-5)


def test_score_map_lets_the_small_index_rank_like_the_large_model():
    torch.manual_seed(0)
    small_docs, lift = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1), torch.randn(16, 48)
    large_docs = torch.nn.functional.normalize(small_docs @ lift + 0.05 * torch.randn(300, 48), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16) @ lift + 0.05 * torch.randn(20, 48), dim=-1)
    large_top = (queries @ large_docs.T).topk(10).indices
    for weight in (score_map(small_docs, large_docs, 1e-3), score_map(small_docs, large_docs, 1e-3, queries), None):
        mapped = queries[:, :16] if weight is None else queries @ weight.T  # None: a map that ignores the scores
        small_top = (mapped @ small_docs.T).topk(10).indices
        shared = (small_top[:, :, None] == large_top[:, None, :]).any(-1).float().mean()
        assert shared > 0.8 if weight is not None else shared < 0.2  # of the large model's top 10, on the small index


def test_bad_cross_recipes_fail_with_one_line(cross_recipe, tmp_path):
    with pytest.raises(FinetuneError, match=r"train_ratios: .*\(0, 1\]"):
        cross_recipe(train_ratios=[0.0, 0.5])
    with pytest.raises(FinetuneError, match="mode"):
        cross_recipe(mode=["both", "both"])
    no_domain = cross_recipe(domains={"per_domain": True, "min_queries": 500})
    with pytest.raises(FinetuneError, match="min_queries"):
        run_recipe(no_domain, echo=lambda *_: None)
    assert not (tmp_path / "runs").exists()  # checked before a run directory is made
    (tmp_path / "empty").mkdir()
    for side in ("query_model", "document_model"):  # the error names the field the folder came from
        no_model = cross_recipe(**{side: {"name": str(tmp_path / "empty")}})
        with pytest.raises(FinetuneError, match=rf"^{side}\.name .*empty: folder has no config\.json"):
            run_recipe(no_model, echo=lambda *_: None)
    assert not (tmp_path / "runs").exists()
    raw = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "cross_adapter.yaml").read_text())
    assert validate_recipe(raw).modes() == ["both", "alignment_only", "label_only"]


def test_api_query_encoder_trains_saves_the_projection_and_no_model(pairs_file, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_EMBED_KEY", "sk-test")
    lines = []
    with FakeOpenAI() as fake:
        api = {
            "provider": "openai_compatible",
            "name": "fake-embed-large",
            "base_url": fake.base_url,
            "dimensions": 48,
            "api_key_env": "FAKE_EMBED_KEY",
        }
        recipe = _recipe(pairs_file, tiny_model, tiny_model, tmp_path, query_model=api, train_ratios=[1.0])
        run_dir = run_recipe(recipe, echo=lines.append)
        assert any(r["path"] == "/v1/embeddings" for r in fake.requests)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dims"] == {"query_model": 48, "document_model": 32} and metrics["export_max_abs_diff"] is None
    assert load_projection(run_dir / "projection").describe()["d_in"] == 48 and not (run_dir / "model").exists()
    assert any(line.startswith("model/: not written") for line in lines)


def test_alignment_texts_are_embedded_by_both_and_never_a_query(cross_recipe, tmp_path):
    pairs = make_pairs(60)
    texts = tmp_path / "more.jsonl"
    extra = [f"extra passage {i} about {pairs[i]['category']}" for i in range(12)]
    # a query's text in the file is dropped: test queries must never reach alignment
    texts.write_text("\n".join(json.dumps({"text": t}) for t in [*extra, pairs[0]["question"], extra[0]]) + "\n")
    recipe = cross_recipe(
        mode="alignment_only",
        train_ratios=[1.0],
        alignment={"objective": ["scores", "identical_text"], "epochs": 3, "texts": str(texts)},
    )
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    assert json.loads((run_dir / "metrics.json").read_text())["alignment_texts"] == len(extra)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"alignment": {"texts": "missing.txt"}}, "alignment.texts .*missing.txt: not found"),
        ({"alignment": {"texts": "empty.jsonl"}}, "alignment.texts .*empty.jsonl: holds no text"),
        ({"alignment": {"texts": "bad.bin"}}, "unknown file type"),
        ({"projection": {"type": "mlp"}}, "closed-form linear map; set projection.type: linear"),
        ({"query_model": {"provider": "openai_compatible", "name": "x"}}, "needs base_url"),
        ({"alignment": {"objective": ["scores", "scores"]}}, "at most once"),
        ({"alignment": {"mix": [0.5, 2.0]}}, r"mix weights in \[0, 1\]"),
        ({"alignment": {"ridge": [0.0]}}, "ridge values > 0"),
        ({"mode": "label_only", "alignment": {"ridge": [0.5]}}, "alignment.ridge=.* has no effect unless"),
        ({"projection": {"input": "large"}, "alignment": {"mix": [0, 1]}}, "projection.input is both"),
        (
            {"mode": "label_only", "alignment": {}, "projection": {"init": "saved"}},
            r"projection.init saved: holds a 48->32 input large",
        ),
    ],
)
def test_bad_alignment_settings_fail_with_one_line_and_write_nothing(
    cross_recipe, tmp_path, monkeypatch, change, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.bin").write_text("x")
    save_projection(Projection(48, 32), tmp_path / "saved")  # another query encoder's width
    with pytest.raises(FinetuneError, match=message) as info:
        recipe = cross_recipe(**{"train_ratios": [1.0], **change})
        run_recipe(recipe, echo=lambda *_: None)
    assert "\n" not in str(info.value) and not (tmp_path / "runs").exists()


def test_extra_sets_are_scored_small_large_and_exported(cross_recipe, tiny_model, tiny_model_wide, tmp_path):
    from conftest import write_beir

    from finetune.config import DataConfig, SplitConfig
    from finetune.evaluation import build_evaluator, evaluate
    from finetune.extra_sets import load_extra_sets

    folder = write_beir(tmp_path / "other", n=40)
    recipe = cross_recipe(mode="both", alignment={"objective": "scores"}, eval={"also": [str(folder)]})
    run_dir = run_recipe(recipe, echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    also = metrics["also"]["other"]
    extra = load_extra_sets([DataConfig(path=str(folder))], SplitConfig(), 42)[0]
    evaluator = build_evaluator(extra.data, extra.test, "x")
    plain = {
        "base": SentenceTransformer(str(tiny_model), device="cpu"),
        "large_model_alone": SentenceTransformer(str(tiny_model_wide), device="cpu"),
        "tuned": SentenceTransformer(str(run_dir / "model"), device="cpu", trust_remote_code=True),
    }
    for row, model in plain.items():
        assert also[row]["ndcg@10"] == pytest.approx(evaluate(evaluator, model)["ndcg@10"], abs=1e-6), row
    assert metrics["seconds"]["evaluate_also"] > 0


def test_merge_scale_is_refused_for_a_cross_adapter(cross_recipe):
    with pytest.raises(FinetuneError, match="merge: unknown field for cross_adapter recipes .*adapter, qlora"):
        cross_recipe(merge={"scale": 0.5})
