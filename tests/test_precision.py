"""Stored precision: NDCG@10 with int8 and binary vectors, checked against sentence-transformers' own evaluator
(float32) and against an independent reference written the way sentence-transformers' search does it."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import COLUMNS_PAIRS, adapter_recipe
from sentence_transformers.util import quantize_embeddings

from finetune.data.dataset import RetrievalData
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate
from finetune.precision import RESCORE, ndcg_at_precision, relevant_rows
from finetune.recipe import validate_recipe
from finetune.run import run_recipe


@pytest.fixture(scope="module")
def toy():
    """300 documents, 40 queries with one to three relevant documents each; 24-d embeddings near their positives."""
    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(300, 24, generator=g)
    relevant = [set(torch.randperm(300, generator=g)[: 1 + i % 3].tolist()) for i in range(40)]
    queries = torch.stack([corpus[sorted(r)].mean(0) for r in relevant]) + 0.9 * torch.randn(40, 24, generator=g)
    data = RetrievalData(
        queries={f"q{i}": f"query {i}" for i in range(40)},
        corpus={f"d{j:03d}": f"doc {j}" for j in range(300)},
        relevant={f"q{i}": {f"d{j:03d}" for j in r} for i, r in enumerate(relevant)},
    )
    return data, queries, corpus


def _reference_ndcg(top: list[list[int]], relevant: list[set[int]]) -> float:
    def one(ranked, rel):
        dcg = sum(1 / math.log2(i + 2) for i, r in enumerate(ranked[:10]) if r in rel)
        return dcg / sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10)))

    return float(np.mean([one(t, r) for t, r in zip(top, relevant)]))


def test_float32_is_the_evaluators_figure(toy):
    data, queries, corpus = toy
    ids = list(data.queries)
    lookup = EmbeddingLookup(list(data.queries.values()), queries, list(data.corpus.values()), corpus)
    expected = evaluate(build_evaluator(data, ids, "test"), lookup, corpus_embeddings=corpus)["ndcg@10"]
    assert ndcg_at_precision(queries, corpus, relevant_rows(data, ids), "float32") == pytest.approx(expected, abs=1e-9)


def _int8_reference(q: np.ndarray, d: np.ndarray, rescore: bool = True) -> list[list[int]]:
    """Each query's top 10 as sentence-transformers' ``semantic_search_usearch`` finds it with an int8 corpus: the
    codes' dot product picks :data:`RESCORE` candidates, then the float query against each candidate's codes mapped
    back into its range (the bottom of its bucket, as ``quantize_embeddings`` floors) orders them; ties by id."""
    dq = quantize_embeddings(d, "int8", calibration_embeddings=d).astype(np.int64)
    qq = quantize_embeddings(q, "int8", calibration_embeddings=d).astype(np.int64)
    low, step = d.min(0).astype(np.float64), (d.max(0).astype(np.float64) - d.min(0)) / 255
    values = (dq + 128) * step + low
    top = []
    for i, row in enumerate(qq @ dq.T):
        candidates = sorted(range(len(d)), key=lambda j: (-row[j], j))[: RESCORE if rescore else 10]
        if rescore:
            candidates = sorted(candidates, key=lambda j: (-float(q[i].astype(np.float64) @ values[j]), j))
        top.append(candidates[:10])
    return top


def test_int8_is_the_codes_top_100_rescored_with_the_float_query(toy):
    data, queries, corpus = toy
    q, d = (torch.nn.functional.normalize(x, dim=1).numpy() for x in (queries, corpus))
    relevant = relevant_rows(data, list(data.queries))
    got = ndcg_at_precision(queries, corpus, relevant, "int8")
    assert got == pytest.approx(_reference_ndcg(_int8_reference(q, d), relevant), abs=1e-12)


def test_int8_keeps_a_cloud_off_the_origin_where_the_codes_alone_lose_it():
    """Embeddings sharing one direction (a distilled student's, an adapter's queries): the codes' dot product adds a
    document-dependent offset term, and loses more of the ranking the further the cloud sits off the origin;
    rescoring with the float query gives float32's figure back."""
    lost = {}
    for shift in (0.0, 2.0):
        g = torch.Generator().manual_seed(3)
        shared = torch.randn(32, generator=g)
        corpus = shift * shared / shared.norm() * 32**0.5 / 4 + torch.randn(400, 32, generator=g) / 2
        relevant = [{j} for j in range(0, 400, 5)]
        queries = corpus[::5] + 0.5 * torch.randn(80, 32, generator=g)
        q, d = (torch.nn.functional.normalize(x, dim=1).numpy() for x in (queries, corpus))
        float32 = ndcg_at_precision(queries, corpus, relevant, "float32")
        assert ndcg_at_precision(queries, corpus, relevant, "int8") == pytest.approx(float32, abs=0.005)
        lost[shift] = float32 - _reference_ndcg(_int8_reference(q, d, rescore=False), relevant)
    assert lost[2.0] > 0.05 and lost[2.0] > 2 * lost[0.0], lost


def test_binary_is_hamming_top_100_rescored_with_the_float_query(toy):
    """The reference packs bits and counts Hamming distance, then rescores as ``semantic_search_faiss`` does
    (float query against the unpacked 0/1 bits)."""
    data, queries, corpus = toy
    q, d = (torch.nn.functional.normalize(x, dim=1).numpy() for x in (queries, corpus))
    packed_q, packed_d = np.packbits(q > 0, axis=-1), np.packbits(d > 0, axis=-1)
    bits = np.unpackbits(packed_d, axis=-1)[:, : d.shape[1]].astype(np.float64)
    top = []
    for i in range(len(q)):
        hamming = np.unpackbits(packed_q[i] ^ packed_d, axis=-1).sum(1)
        candidates = sorted(range(len(d)), key=lambda j: (hamming[j], j))[:RESCORE]
        rescored = {j: float(q[i].astype(np.float64) @ bits[j]) for j in candidates}
        top.append(sorted(candidates, key=lambda j: (-rescored[j], j))[:10])
    relevant = relevant_rows(data, list(data.queries))
    assert ndcg_at_precision(queries, corpus, relevant, "binary") == pytest.approx(
        _reference_ndcg(top, relevant), abs=1e-12
    )


def test_a_run_reports_stored_precision_beside_its_own_rows(tiny_model, pairs_file, tmp_path):
    """float32 is the run's own base and tuned figure; the line under the table says the rest."""
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path)
    lines = []
    run_dir = run_recipe(validate_recipe(raw), echo=lines.append)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in ("base", "tuned"):
        assert metrics["precision"][row]["float32"] == pytest.approx(metrics[row]["ndcg@10"], abs=1e-6)
    assert any(str(line).startswith("stored precision, test NDCG@10 base -> tuned: float32") for line in lines)


@pytest.mark.parametrize("levels", [3, 50, 10_000])
def test_top_k_is_score_then_lowest_id_with_any_number_of_ties(levels):
    """Few score levels (ties past the top-k superset), some, and almost none: the same order as a full sort."""
    from finetune.precision import _stable_topk

    g = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (40, 500), generator=g).double()
    rows = torch.stack([torch.randperm(500, generator=g) for _ in range(40)])
    got = rows.gather(1, _stable_topk(scores, 10, rows))
    expected = [[r for _, r in sorted(zip((-scores[i]).tolist(), rows[i].tolist()))][:10] for i in range(len(scores))]
    assert got.tolist() == expected


def test_relevant_rows_follow_the_documents_given(toy):
    """Rows of a candidate list (its own order), not of the corpus: the ONNX check scores a subset."""
    data, _, _ = toy
    doc_ids = list(data.corpus)[::-1]
    rows = relevant_rows(data, ["q0", "q1"], doc_ids)
    assert rows == [{doc_ids.index(d) for d in data.relevant[q]} for q in ("q0", "q1")]
    assert rows != relevant_rows(data, ["q0", "q1"])
