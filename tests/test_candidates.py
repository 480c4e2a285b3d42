"""Validation against a candidate set of bounded size; the base model's corpus encoded once and shared."""

import json
import random

import pytest
import torch
from conftest import qlora_recipe
from sentence_transformers import SentenceTransformer

from finetune.base_corpus import BaseCorpus, KnownDocuments
from finetune.candidates import candidate_ids
from finetune.config import NegativesConfig
from finetune.data import load_data
from finetune.evaluation import build_evaluator, evaluate
from finetune.mining import find_negatives
from finetune.prompts import Prompts
from finetune.recipe import validate_recipe
from finetune.splits import make_splits

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _world(n_docs=500, n_queries=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [f"d{i:04d}" for i in range(n_docs)]
    relevant = {f"q{i}": {docs[(7 * i) % n_docs], docs[(7 * i + 1) % n_docs]} for i in range(n_queries)}
    return docs, relevant, torch.randn(n_queries, dim, generator=g), torch.randn(n_docs, dim, generator=g)


def test_the_candidate_set_holds_every_positive_the_base_top_documents_and_stays_under_the_cap():
    docs, relevant, queries, documents = _world()
    ids = candidate_ids(docs, relevant, queries, documents, cap=200, seed=1)
    assert len(ids) == 200 and len(set(ids)) == 200 and ids == sorted(ids)  # corpus order
    assert {d for r in relevant.values() for d in r} <= set(ids)  # 80 positives
    cosine = torch.nn.functional.normalize(queries) @ torch.nn.functional.normalize(documents).T
    top1 = {docs[i] for i in cosine.topk(1).indices[:, 0]}
    assert top1 <= set(ids)  # each query's hardest document under the base model (60 hard places for 40 queries)
    assert candidate_ids(docs, relevant, queries, documents, cap=200, seed=1) == ids  # seeded
    assert candidate_ids(docs, relevant, queries, documents, cap=200, seed=2) != ids


def test_a_corpus_under_the_cap_is_kept_whole():
    docs, relevant, queries, documents = _world(n_docs=100)
    assert candidate_ids(docs, relevant, queries, documents, cap=100, seed=0) == docs


def test_positives_beyond_the_cap_are_all_kept():
    docs, relevant, queries, documents = _world(n_docs=200, n_queries=60)
    ids = candidate_ids(docs, relevant, queries, documents, cap=50, seed=0)
    assert {d for r in relevant.values() for d in r} <= set(ids)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A qlora runner set up (nothing trained) on 60 pairs with validation capped at 12 documents."""
    from conftest import make_pairs

    from finetune.qlora.runner import QLoRARun

    tmp = tmp_path_factory.mktemp("candidates")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS}, tiny_model, tmp, steps=4)
    raw["train"]["val_documents"] = 12
    raw["negatives"] = {"strategy": "mined", "per_query": 2}
    recipe = validate_recipe(raw)
    data = load_data(recipe.data)
    return QLoRARun(recipe, data, make_splits(data, recipe.splits, recipe.seed), "cpu", echo=lambda *_: None)


def test_validation_scores_candidates_and_the_test_split_the_whole_corpus(run):
    val = run._evaluator(run.splits.val, "val")
    test = run._evaluator(run.splits.test, "test")
    positives = {d for q in run.splits.val for d in run.data.relevant[q]}
    assert len(val.corpus) == 12 and positives <= set(val.corpus_ids) < set(run.data.corpus)
    assert set(test.corpus_ids) == set(run.data.corpus)


def test_the_shared_corpus_embeddings_give_the_evaluator_s_base_row_and_the_same_mined_negatives(run, tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    evaluator = build_evaluator(run.data, run.splits.test, "test")
    shared = evaluate(evaluator, model, corpus_embeddings=run.base_corpus.embeddings)
    assert shared == pytest.approx(evaluate(evaluator, model), abs=1e-6)

    config = NegativesConfig(strategy="mined", per_query=3)
    base = BaseCorpus(model, run.data, Prompts(None, None), batch_size=16)
    looked_up = find_negatives(run.data, run.splits.train, config, model=base.as_model(), seed=0, batch_size=16)
    encoded = find_negatives(run.data, run.splits.train, config, model=model, seed=0, batch_size=16)
    assert looked_up.by_query == encoded.by_query


def test_shuffled_documents_are_looked_up_by_text(run):
    known = run.base_corpus.as_model()
    texts = list(run.data.corpus.values())
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    rows = known.encode_document([texts[i] for i in order], convert_to_tensor=True)
    assert torch.equal(rows, run.base_corpus.embeddings[order])
    scaled = KnownDocuments(run.base_corpus.model, texts, 3 * run.base_corpus.embeddings)  # rows of norm 3
    normalised = scaled.encode_document(texts[:3], normalize_embeddings=True)  # mining asks for unit rows
    assert normalised.shape == (3, rows.shape[1]) and abs(float((normalised**2).sum(1).mean()) - 1) < 1e-5


def test_a_run_past_the_cap_reports_the_full_corpus_and_checks_merging_on_the_test_candidates(tiny_model, tmp_path):
    """160 documents, cap 48: validation and the as-trained check see 48; the reported rows the whole corpus."""
    from conftest import make_pairs, score_on_run_split

    from finetune.run import run_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(160)))
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS}, tiny_model, tmp_path, steps=4)
    raw["train"]["val_documents"] = 48
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_documents"] == 48 and metrics["n_corpus"] == 160
    check = metrics["export"]["as_trained"]
    assert check["documents"] == 48 and check["ndcg@10"] == metrics["tuned_as_trained"]["ndcg@10"]
    assert "as-trained check" in metrics["stages"]
    # the tuned row is the exported model over all 160 documents, which ranks the positives lower than 48 do
    assert score_on_run_split(run_dir, run_dir / "model")["ndcg@10"] == pytest.approx(
        metrics["tuned"]["ndcg@10"], abs=1e-4
    )
    assert check["exported_ndcg@10"] > metrics["tuned"]["ndcg@10"]
