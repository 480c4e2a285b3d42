"""What the gain keeps when a vector database stores the embeddings at lower precision.

Users store vectors as int8 or binary (Qdrant, Weaviate, pgvector, usearch). For each of the run's
models this scores the test split three ways, with sentence-transformers' ``quantize_embeddings``:

- ``float32``: cosine over full-precision vectors (the evaluator's own figure, recomputed here as a check);
- ``int8``: corpus and queries quantised to int8 with ranges calibrated on the corpus; the top :data:`RESCORE` by
  the codes' dot product, rescored with the float query against the values the document's codes stand for (the
  int8 search of sentence-transformers' ``semantic_search_usearch``);
- ``binary``: the sign bits, the top :data:`RESCORE` by Hamming distance, rescored with the float query against
  the document's bits (the rescoring of sentence-transformers' ``semantic_search_faiss``).

Both rescore because the first stage alone is not what a stored vector can give: an int8 code is
``(x - low) / step - 128`` in each dimension, so the codes' dot product weighs dimensions by ``1 / step^2``
and adds a document-dependent term from the ranges' offsets. Fine-tuning that moves the embedding cloud off the
origin (a distilled student, a query adapter) lost up to 0.04 NDCG@10 to that term alone, not to rounding
(``benchmarks/precision_diagnose.py``).

Queries are scored 256 at a time against 32,768 corpus rows at a time, so memory does not grow with the
corpus beyond its embeddings.

Example:
    >>> import torch
    >>> q, d = torch.eye(2), torch.tensor([[1.0, -0.2], [-0.2, 1.0], [-1.0, -1.0]])
    >>> ndcg_at_precision(q, d, [{0}, {1}], "binary")
    1.0
"""

from __future__ import annotations

import math

import numpy as np
import torch

from finetune.stages import stage

PRECISIONS = ("float32", "int8", "binary")
RESCORE = 100  # int8 and binary: first-stage candidates rescored with the float query
CHUNK = 32_768  # corpus rows scored at once
QUERIES = 256  # queries scored at once: a block's scores against a chunk stay at 64 MiB


def ndcg_at_precision(queries: torch.Tensor, corpus: torch.Tensor, relevant: list[set[int]], precision: str) -> float:
    """Mean NDCG@10 of ``queries`` against ``corpus`` stored at ``precision``.

    Args:
        queries: Query embeddings, one row per query (raw; normalised here, as cosine does).
        corpus: Document embeddings, in corpus order.
        relevant: For each query, the corpus rows relevant to it.
        precision: One of :data:`PRECISIONS`.
    """
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    d = torch.nn.functional.normalize(corpus.float(), dim=1)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    rank = _ranker(d, precision)
    top = torch.cat([rank(block) for block in q.split(QUERIES)])  # a block of queries against a chunk at a time
    return float(np.mean([ndcg_at_10(row.tolist(), rel) for row, rel in zip(top, relevant)]))


def _ranker(d: torch.Tensor, precision: str):
    """``rank(queries)``: the top 10 corpus rows of each query (normalised) against ``d`` stored at ``precision``."""
    if precision == "float32":
        return lambda q: top_rows(q, d, 10, lambda a, b: a @ b.T)
    if precision == "int8":
        from sentence_transformers.util import quantize_embeddings

        ranges = np.vstack([d.min(0).values.numpy(), d.max(0).values.numpy()])  # calibrated on the corpus
        low, step = torch.from_numpy(ranges[0]).double(), torch.from_numpy((ranges[1] - ranges[0]) / 255).double()
        step = torch.where(step == 0, 1, step)  # a constant dimension: quantize_embeddings divides by 1 there too
        codes = lambda x: torch.from_numpy(quantize_embeddings(x.numpy(), "int8", ranges=ranges)).double()  # noqa: E731
        return _rescoring(d, codes, lambda c: (c + 128) * step + low)
    signs = lambda x: (x > 0).float() * 2 - 1  # noqa: E731  (packed bits' Hamming order: dim - 2 x Hamming)
    return _rescoring(d, signs, lambda bits: bits)  # the float query against the bits


def _rescoring(d: torch.Tensor, store, value):
    """``rank(queries)``: the top :data:`RESCORE` rows by the dot product of ``store(queries)`` and ``store(d)``,
    then the top 10 of those by the float query against ``value(store(d))``, what a stored row stands for."""

    def rank(q: torch.Tensor) -> torch.Tensor:
        candidates = top_rows(store(q), d, min(RESCORE, len(d)), lambda a, b: a @ store(b).T)
        rescored = torch.einsum("qd,qkd->qk", q, value(store(d[candidates])).to(q.dtype))
        return candidates.gather(1, _stable_topk(rescored, min(10, candidates.shape[1]), candidates))

    return rank


def deployment_precision(relevant: list[set[int]], rows: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Test NDCG@10 of each model at each of :data:`PRECISIONS`.

    Args:
        relevant: For each test query, its relevant corpus rows.
        rows: model name (``base``, ``tuned``) -> ``(test query embeddings, corpus embeddings)``.

    Returns:
        ``{"base": {"float32": ..., "int8": ..., "binary": ...}, "tuned": {...}}``.
    """
    with stage("stored precision"):
        return {name: {p: ndcg_at_precision(q, d, relevant, p) for p in PRECISIONS} for name, (q, d) in rows.items()}


def model_precision(model, data, query_ids: list[str], prompts, batch_size: int, corpus: torch.Tensor) -> dict:
    """``model``'s test NDCG@10 at each of :data:`PRECISIONS`: its queries (encoded here, with ``prompts.query``)
    against ``corpus``, its own embeddings of the whole corpus in corpus order."""
    texts = [data.queries[q] for q in query_ids]
    queries = model.encode_query(texts, prompt=prompts.query, batch_size=batch_size, convert_to_tensor=True).cpu()
    return deployment_precision(relevant_rows(data, query_ids), {"model": (queries, corpus)})["model"]


def relevant_rows(data, query_ids: list[str], doc_ids: list[str] | None = None) -> list[set[int]]:
    """Each query's relevant documents as rows of ``doc_ids`` (default: the corpus, in corpus order)."""
    row = {d: i for i, d in enumerate(data.corpus if doc_ids is None else doc_ids)}
    return [{row[d] for d in data.relevant[q]} for q in query_ids]


def precision_line(record: dict) -> str:
    """One line under the run's table: NDCG@10 base -> tuned at each stored precision."""
    cells = [f"{p} {record['base'][p]:.4f} -> {record['tuned'][p]:.4f}" for p in PRECISIONS]
    rescored = f"(int8 and binary: top {RESCORE} rescored)"
    return f"stored precision, test NDCG@10 base -> tuned: {'; '.join(cells)} {rescored}"


def top_rows(queries: torch.Tensor, corpus: torch.Tensor, k: int, score) -> torch.Tensor:
    """The ``k`` best corpus rows per query under ``score(queries, corpus_chunk)``, a chunk of the corpus at a time;
    equal scores go to the lower row, as the evaluator breaks ties by corpus id."""
    best_scores, best_rows = None, None
    for start in range(0, len(corpus), CHUNK):
        scores = score(queries, corpus[start : start + CHUNK]).double()
        rows = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        if best_scores is not None:
            scores, rows = torch.cat([best_scores, scores], 1), torch.cat([best_rows, rows], 1)
        keep = _stable_topk(scores, min(k, scores.shape[1]), rows)
        best_scores, best_rows = scores.gather(1, keep), rows.gather(1, keep)
    return best_rows


def _stable_topk(scores: torch.Tensor, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, ties to the lower ``rows`` value (or position).

    ``torch.topk`` takes a few more than ``k`` (linear in the row's length), which are then sorted exactly;
    a row whose ties at the k-th score may run past that superset is sorted in full.
    """
    rows = torch.arange(scores.shape[1]).expand_as(scores) if rows is None else rows
    wide = min(scores.shape[1], k + 16)
    values, superset = torch.topk(scores, wide, dim=1)  # values descending
    picked = superset.gather(1, _sorted_by_score_then_row(values, rows.gather(1, superset))[:, :k])
    if wide < scores.shape[1]:
        spill = values[:, -1] == values[:, k - 1]  # equal scores may lie outside the superset
        if spill.any():
            picked[spill] = _sorted_by_score_then_row(scores[spill], rows[spill])[:, :k]
    return picked


def _sorted_by_score_then_row(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Column order per row: score descending, then row id ascending."""
    order = torch.argsort(rows, dim=1, stable=True)  # by id first: a stable sort by score keeps ties in id order
    return order.gather(1, torch.argsort(-scores.gather(1, order), dim=1, stable=True))


def ndcg_at_10(ranked: list, relevant: set) -> float:
    """NDCG@10 of one ranking (ids, best first) against the set of relevant ids (binary gains)."""
    dcg = sum(1 / math.log2(i + 2) for i, r in enumerate(ranked[:10]) if r in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
    return dcg / ideal
