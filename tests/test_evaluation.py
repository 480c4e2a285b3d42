import math

import pytest
import torch

from finetune.data import RetrievalData
from finetune.evaluation import HEADLINE, EmbeddingLookup, build_evaluator, evaluate


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


def _hits(scores: dict[str, float]) -> list[dict]:
    """The parent's result rows for one query, in the order given (not sorted)."""
    return [{"corpus_id": d, "score": s} for d, s in scores.items()]


def test_per_query_values_with_several_relevant_documents_and_exact_ties():
    """Hand-made rankings: two relevant documents (one outside the top 10), and a three-way tie at the top.

    Each value is worked out by hand; the means must also be the parent's own figures, which it
    reads off the same result lists.
    """
    corpus = {f"d{i:02d}": f"doc {i}" for i in range(12)}
    data = RetrievalData(
        queries={"split": "a", "both": "b", "tie": "c"},
        corpus=corpus,
        relevant={"split": {"d01", "d11"}, "both": {"d00", "d03"}, "tie": {"d05"}},
    )
    evaluator = build_evaluator(data, ["split", "both", "tie"])
    descending = {d: 1.0 - i / 20 for i, d in enumerate(["d04", "d06", "d01", *[f"d0{j}" for j in (7, 8, 9)]])}
    descending |= {"d10": 0.6, "d02": 0.55, "d00": 0.5, "d03": 0.45, "d05": 0.4, "d11": 0.1}
    results = [
        _hits(dict(reversed(descending.items()))),  # split: d01 3rd, d11 12th
        _hits({"d00": 0.9, "d09": 0.8, "d03": 0.7, **{d: 0.1 for d in corpus if d not in ("d00", "d09", "d03")}}),
        # tie: d05 is listed first, but ties are broken by corpus id, so d02 ranks first and d05 second
        _hits({"d05": 0.9, "d09": 0.9, "d02": 0.9, **{d: 0.1 for d in corpus if d not in ("d05", "d09", "d02")}}),
    ]
    parent = evaluator.compute_metrics([list(r) for r in results])
    per_query = evaluator.per_query
    ideal_two = 1 + 1 / math.log2(3)
    assert per_query["split"] == pytest.approx(
        {"ndcg@10": (1 / math.log2(4)) / ideal_two, "mrr@10": 1 / 3, "accuracy@1": 0.0, "recall@10": 0.5}
    )
    assert per_query["both"] == pytest.approx(
        {"ndcg@10": (1 + 1 / math.log2(4)) / ideal_two, "mrr@10": 1.0, "accuracy@1": 1.0, "recall@10": 1.0}
    )
    assert per_query["tie"] == pytest.approx(
        {"ndcg@10": 1 / math.log2(3), "mrr@10": 0.5, "accuracy@1": 0.0, "recall@10": 1.0}
    )
    assert all(0 <= v <= 1 for row in per_query.values() for v in row.values())
    means = {
        m: sum(row[m] for row in per_query.values()) / 3 for m in ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")
    }
    assert means == pytest.approx(
        {
            "ndcg@10": parent["ndcg@k"][10],
            "mrr@10": parent["mrr@k"][10],
            "accuracy@1": parent["accuracy@k"][1],
            "recall@10": parent["recall@k"][10],
        },
        abs=1e-12,
    )


def test_per_query_means_equal_the_evaluators_figures_with_tied_embeddings():
    """End to end through :func:`evaluate`: duplicated documents tie exactly, and queries have two positives."""
    docs = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    queries = torch.tensor([[1.0, 0.1, 0], [0, 1.0, 0.2], [0.3, 0.3, 1.0], [0.5, 0.5, 0.5]])
    texts = [f"d{i}" for i in range(len(docs))]
    data = RetrievalData(
        queries={f"q{i}": f"q{i}" for i in range(4)},
        corpus={t: t for t in texts},
        relevant={"q0": {"d1"}, "q1": {"d3", "d4"}, "q2": {"d4", "d0"}, "q3": {"d5", "d2"}},
    )
    lookup = EmbeddingLookup(list(data.queries.values()), queries, texts, docs)
    scores = evaluate(build_evaluator(data, list(data.queries)), lookup)
    assert scores.per_query["q0"]["mrr@10"] == 0.5  # d0 and d1 tie; d0 wins on corpus id
    for metric in ("ndcg@10", "mrr@10", "accuracy@1", "recall@10"):
        mean = sum(row[metric] for row in scores.per_query.values()) / 4
        assert mean == pytest.approx(scores[metric], abs=1e-12), metric


def test_cutoffs_at_five_and_ten_and_a_query_with_more_than_ten_relevant_documents():
    """accuracy@5 and precision@5 with the first hit at rank 6; NDCG@10's ideal capped at 10 of 12 relevant."""
    corpus = {f"d{i:02d}": f"doc {i}" for i in range(30)}
    data = RetrievalData(
        queries={"late": "a", "many": "b"},
        corpus=corpus,
        relevant={"late": {"d05"}, "many": {f"d{i:02d}" for i in range(12)}},
    )
    evaluator = build_evaluator(data, ["late", "many"])
    ranked = [_hits({d: 1.0 - i / 100 for i, d in enumerate(corpus)})] * 2  # d00 first, d05 sixth
    parent = evaluator.compute_metrics([list(r) for r in ranked])
    assert parent["accuracy@k"][5] == 0.5 and parent["accuracy@k"][10] == 1.0  # "late" misses the top 5
    assert parent["precision@k"][5] == pytest.approx((0 + 5 / 5) / 2)
    assert evaluator.per_query["many"]["ndcg@10"] == pytest.approx(1.0)  # ten relevant in the top 10: ideal
    assert evaluator.per_query["many"]["recall@10"] == pytest.approx(10 / 12)
    data3, lookup, _ = _known_case()
    assert set(HEADLINE) <= evaluate(build_evaluator(data3, ["q0", "q1", "q2"]), lookup).keys()


def test_lookup_similarities_are_cosine_like_a_model():
    """Mining (sentence-transformers' ``mine_hard_negatives``) scores positives with ``similarity_pairwise``."""
    from sentence_transformers.util import cos_sim

    a, b = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4)
    lookup = EmbeddingLookup([], torch.empty(0, 4))
    assert torch.allclose(lookup.similarity(a, b), cos_sim(a, b))
    assert torch.allclose(lookup.similarity_pairwise(a, b), cos_sim(a, b).diagonal())


def test_corpus_chunks_hold_a_bounded_number_of_cells_and_rank_the_same(monkeypatch):
    """The evaluator's corpus chunk shrinks as queries grow (its tie handling builds queries x chunk int64
    matrices: 1.3 GB at 1,593 queries and the default 50,000), and chunking does not change any figure, ties
    across chunk boundaries included."""
    from finetune import evaluation

    many = RetrievalData(
        queries={f"q{i}": "x" for i in range(5000)}, corpus={"d": "x"}, relevant={f"q{i}": {"d"} for i in range(5000)}
    )
    assert build_evaluator(many, list(many.queries)).corpus_chunk_size * 5000 <= evaluation.CHUNK_CELLS
    assert build_evaluator(many, ["q0"]).corpus_chunk_size == 50_000

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    docs = torch.cat([base, base[:25]])  # 25 exact duplicates: ties at every rank they reach
    texts = [f"d{i:02d}" for i in range(len(docs))]
    queries = torch.nn.functional.normalize(base[:12] + 0.3 * torch.randn(12, 8, generator=g), dim=1)
    data = RetrievalData(
        queries={f"q{i}": f"q{i}" for i in range(12)},
        corpus={t: t for t in texts},
        relevant={f"q{i}": {texts[i], texts[40 + i % 25]} for i in range(12)},
    )
    lookup = EmbeddingLookup(list(data.queries.values()), queries, texts, docs)
    whole = evaluate(build_evaluator(data, list(data.queries)), lookup, corpus_embeddings=docs)
    monkeypatch.setattr(evaluation, "corpus_chunk_size", lambda n: 7)  # chunks of 7 split duplicates apart
    chunked = evaluate(build_evaluator(data, list(data.queries)), lookup, corpus_embeddings=docs)
    assert dict(chunked) == pytest.approx(dict(whole), abs=1e-12)
    assert chunked.per_query == whole.per_query
