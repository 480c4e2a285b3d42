import math

import pytest
import torch

from finetune.data import RetrievalData
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate


def _known_case():
    """3 queries, 4 documents; the relevant document ranks 1st, 2nd and 3rd respectively."""
    docs = torch.eye(4)
    queries = torch.tensor(
        [
            [1.0, 0.5, 0.2, 0.0],  # q0 -> d0 first
            [0.9, 0.5, 0.0, 0.0],  # q1 -> d1 second (d0 first)
            [0.9, 0.5, 0.3, 0.0],  # q2 -> d2 third
        ]
    )
    data = RetrievalData(
        queries={"q0": "a", "q1": "b", "q2": "c"},
        corpus={"d0": "w", "d1": "x", "d2": "y", "d3": "z"},
        relevant={"q0": {"d0"}, "q1": {"d1"}, "q2": {"d2"}},
    )
    lookup = EmbeddingLookup(["a", "b", "c"], queries, ["w", "x", "y", "z"], docs)
    return data, lookup, docs


def test_metrics_on_a_case_with_known_answers():
    data, lookup, docs = _known_case()
    m = evaluate(build_evaluator(data, ["q0", "q1", "q2"]), lookup)
    assert m["accuracy@1"] == pytest.approx(1 / 3)
    assert m["accuracy@3"] == pytest.approx(1.0)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["precision@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(1.0)
    assert m["map@100"] == pytest.approx(m["mrr@10"])  # one relevant document each
    assert {"ndcg@10", "mrr@10", "map@100", "accuracy@10", "precision@10", "recall@10"} <= m.keys()


def test_corpus_embeddings_are_reused_not_reencoded():
    data, lookup, docs = _known_case()

    class NoDocumentEncoding(EmbeddingLookup):
        def encode_document(self, *args, **kwargs):
            raise AssertionError("the corpus was re-encoded")

    frozen = NoDocumentEncoding(["a", "b", "c"], lookup._queries[1])
    evaluator = build_evaluator(data, ["q0", "q1", "q2"])
    assert evaluate(evaluator, frozen, corpus_embeddings=docs) == evaluate(evaluator, lookup)
    with pytest.raises(ValueError, match="3 rows for 4 documents"):
        evaluate(evaluator, frozen, corpus_embeddings=docs[:3])


def test_query_transform_changes_the_ranking():
    data, lookup, docs = _known_case()
    to_truth = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    fixed = EmbeddingLookup(
        ["a", "b", "c"], lookup._queries[1], ["w", "x", "y", "z"], docs, query_transform=lambda q: to_truth
    )
    assert evaluate(build_evaluator(data, ["q0", "q1", "q2"]), fixed)["ndcg@10"] == pytest.approx(1.0)


def test_evaluator_matches_a_real_model(tiny_model):
    """The lookup over a model's own embeddings scores exactly like the model itself."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model), device="cpu")
    data = RetrievalData(
        queries={f"q{i}": f"question about {w}" for i, w in enumerate(["roof", "tax", "paint", "drain"])},
        corpus={f"d{i}": f"answer on {w}" for i, w in enumerate(["roof", "tax", "paint", "drain", "fence"])},
        relevant={f"q{i}": {f"d{i}"} for i in range(4)},
    )
    evaluator = build_evaluator(data, list(data.queries))
    q = model.encode(list(data.queries.values()), convert_to_tensor=True)
    d = model.encode(list(data.corpus.values()), convert_to_tensor=True)
    lookup = EmbeddingLookup(list(data.queries.values()), q, list(data.corpus.values()), d)
    assert evaluate(evaluator, lookup) == pytest.approx(evaluate(evaluator, model))
