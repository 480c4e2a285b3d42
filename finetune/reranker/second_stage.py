"""The retriever's ranking, reordered at the top by a reranker, and scored by the shared evaluator.

:func:`first_stage` reads the retriever's top :data:`~finetune.reranker.config.DEPTH` documents per query once
(from the corpus embeddings the run already has). :func:`reranked` puts the reranker's order on the first k
of each and leaves the rest in the retriever's order; :func:`score` hands that ranking to the very metric
code :class:`~finetune.evaluation.PerQueryEvaluator` runs on a bi-encoder, so the two stages' rows, per-query
values and paired intervals are comparable with every other run's. k = 0 is the retriever alone, and
``tests/test_reranker.py`` checks it equals the evaluator's own figure.

Example (not run: it needs a model, data or a server)::
    first = first_stage(retriever, corpus_embeddings, data, splits.val, prompts, 64)
    logits = reranker_logits(reranker, data, first, k=20, batch_size=64)
    score(build_evaluator(data, splits.val, "val"), reranked(first, logits, 10))["ndcg@10"]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.evaluation import Scores
from finetune.precision import top_rows
from finetune.reranker.config import DEPTH
from finetune.stages import stage

QUERIES = 256


@dataclass
class FirstStage:
    """The retriever's ranking of each query: ``ranked[q]`` is its top document ids, best first."""

    ranked: dict[str, list[str]]

    def pairs(self, data, k: int) -> list[tuple[str, str]]:
        """(query text, document text) for the top ``k`` of every query, query by query."""
        return [(data.queries[q], data.corpus[d]) for q, docs in self.ranked.items() for d in docs[:k]]


def first_stage(retriever, corpus_embeddings: torch.Tensor, data, query_ids: list[str], prompts, batch_size: int):
    """The retriever's top :data:`DEPTH` documents for each of ``query_ids`` (ties to the earlier corpus row).

    Args:
        retriever: The first-stage ``SentenceTransformer``.
        corpus_embeddings: ``encode_document`` of the whole corpus, in corpus order.
        data: The run's data.
        query_ids: The queries to rank for.
        prompts: The retriever's prompts (its ``query`` prompt is used).
        batch_size: Encoding batch size.
    """
    with stage("first stage"):
        queries = retriever.encode_query(
            [data.queries[q] for q in query_ids], prompt=prompts.query, batch_size=batch_size, convert_to_tensor=True
        ).cpu()
        corpus, depth = corpus_embeddings.cpu(), min(DEPTH, len(corpus_embeddings))
        # a slice of queries at a time: memory stays QUERIES x a corpus chunk of scores, whatever the split's size
        rows = [
            top_rows(queries[i : i + QUERIES], corpus, depth, retriever.similarity)
            for i in range(0, len(queries), QUERIES)
        ]
        rows = torch.cat(rows) if rows else []
    doc_ids = list(data.corpus)
    return FirstStage({q: [doc_ids[int(r)] for r in row] for q, row in zip(query_ids, rows)})


@torch.no_grad()
def reranker_logits(reranker, data, first: FirstStage, k: int, batch_size: int) -> dict[str, list[float]]:
    """The reranker's raw logit for each query's top ``k`` (raw: a sigmoid would tie saturated scores)."""
    if k == 0:
        return {q: [] for q in first.ranked}
    with stage("reranking"):
        flat = reranker.predict(
            first.pairs(data, k), batch_size=batch_size, activation_fn=torch.nn.Identity(), convert_to_tensor=True
        )
    flat, out, at = flat.float().cpu().reshape(-1).tolist(), {}, 0
    for q, docs in first.ranked.items():
        n = min(k, len(docs))
        out[q], at = flat[at : at + n], at + n
    return out


def reranked(first: FirstStage, logits: dict[str, list[float]], k: int) -> dict[str, list[str]]:
    """Each query's ranking with its top ``k`` in the reranker's order (ties keep the retriever's), the rest
    as the retriever ranked them. ``logits`` must cover at least the top ``k``."""
    out = {}
    for q, docs in first.ranked.items():
        top = sorted(range(min(k, len(docs))), key=lambda i: -logits[q][i])  # sorted() is stable
        out[q] = [docs[i] for i in top] + docs[len(top) :]
    return out


def score(evaluator, ranking: dict[str, list[str]]) -> Scores:
    """The evaluator's metrics of a ranking (plain names, ``per_query`` attached), as :func:`evaluate` returns them.

    Args:
        evaluator: From :func:`~finetune.evaluation.build_evaluator` over the ranked queries.
        ranking: Query id -> document ids, best first.
    """
    results = [
        [{"corpus_id": d, "score": float(len(ranking[q]) - i)} for i, d in enumerate(ranking[q])]
        for q in evaluator.queries_ids
    ]
    raw = evaluator.compute_metrics(results)
    scores = Scores(
        {name.replace("@k", f"@{k}"): float(value) for name, by_k in raw.items() for k, value in by_k.items()}
    )
    scores.per_query = dict(evaluator.per_query)
    return scores


def choose_k(val_ndcg: dict[int, float]) -> int:
    """The k with the best validation NDCG@10; the smallest on a tie (k = 0, no reranking, when nothing helps)."""
    return min(val_ndcg, key=lambda k: (-val_ndcg[k], k))
