"""A validation corpus whose size does not grow with the user's corpus: the candidate set.

Validation runs many times while training, and each time the encoder has changed, so the documents
must be encoded again. Over the whole corpus that cost grows as (evaluations x corpus size). The
candidate set is fixed once, from the base model, and holds at most ``cap`` documents:

1. every relevant document of every validation query (so no positive can be missed);
2. the documents the base model ranks highest for each validation query, taken rank by rank
   (every query's first, then every query's second, ...) until half the room the positives leave
   is used: the hard distractors a tuned model must still rank below the positives;
3. a seeded random sample of the rest, up to the cap: the easy bulk of the corpus.

A corpus no larger than the cap is kept whole, so validation on it is exactly full-corpus
validation. The test split is never scored on candidates.

Example:
    >>> import torch
    >>> docs = [f"d{i}" for i in range(10)]
    >>> emb = torch.eye(10)
    >>> ids = candidate_ids(docs, {"q": {"d3"}}, emb[[5]], emb, cap=4, seed=0)
    >>> "d3" in ids and "d5" in ids, len(ids)
    (True, 4)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from sentence_transformers.util import cos_sim

from finetune.evaluation import query_chunk_size


def candidate_ids(
    doc_ids: Sequence[str],
    relevant: dict[str, set[str]],
    query_embeddings: torch.Tensor,
    document_embeddings: torch.Tensor,
    cap: int,
    seed: int,
    similarity=cos_sim,
    chunk: int | None = None,
) -> list[str]:
    """The candidate set's document ids, in corpus order.

    Args:
        doc_ids: The corpus ids, row for row with ``document_embeddings``.
        relevant: Each validation query's relevant ids, in the order of ``query_embeddings``' rows.
        query_embeddings: The base model's embeddings of the validation queries.
        document_embeddings: The base model's embeddings of the corpus.
        cap: At most this many documents (more only when the positives alone exceed it).
        seed: Fixes the random sample.
        similarity: The model's similarity function (cosine by default).
        chunk: Queries scored at a time, so memory stays ``chunk x corpus`` scores; by default mining's
            bound (:func:`~finetune.evaluation.query_chunk_size`).

    Returns:
        Ids of the positives, the base model's top documents and the random sample.
    """
    if len(doc_ids) <= cap:
        return list(doc_ids)
    keep = {d for ids in relevant.values() for d in ids}
    hard_until = len(keep) + max(0, cap - len(keep)) // 2
    # twice the even share of each query, since their top documents overlap each other and the positives
    depth = max(1, 2 * (hard_until - len(keep)) // max(1, len(relevant)) + 1)
    chunk = chunk or query_chunk_size(len(doc_ids))
    ranked = _top(query_embeddings, document_embeddings, min(depth, len(doc_ids)), similarity, chunk)
    for rank in range(ranked.shape[1]):  # rank by rank, so every query gets its hardest first
        for row in ranked[:, rank].tolist():
            if len(keep) >= hard_until:
                break
            keep.add(doc_ids[row])
    rest = [d for d in doc_ids if d not in keep]
    keep.update(random.Random(seed).sample(rest, max(0, min(len(rest), cap - len(keep)))))
    return [d for d in doc_ids if d in keep]


def _top(queries: torch.Tensor, documents: torch.Tensor, k: int, similarity, chunk: int) -> torch.Tensor:
    """Row indices of each query's ``k`` most similar documents, best first."""
    rows = []
    for start in range(0, len(queries), chunk):
        scores = similarity(queries[start : start + chunk], documents)
        rows.append(torch.topk(scores, k, dim=1).indices)
    return torch.cat(rows) if rows else torch.empty(0, k, dtype=torch.long)
