"""Matryoshka embeddings: train so a prefix of the embedding still retrieves, and score each prefix.

``loss.matryoshka_dims: [384, 256, 128, 64]`` trains with the loss taken on the embedding
truncated to each size (sentence-transformers' ``MatryoshkaLoss`` for encoders; the adapter's
InfoNCE on truncated, renormalised embeddings). :func:`ndcg_by_dimension` scores a model at
each size with the shared evaluator, so a run reports what truncation costs before and after
training: the embeddings are computed once and truncated, not re-encoded per size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from finetune.errors import FinetuneError


def check_matryoshka_dims(dims: list[int] | None) -> list[int] | None:
    """Sizes must be positive and strictly decreasing (the nested loss's order); returns them."""
    if dims is None:
        return None
    if not dims or any(d < 1 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"list decreasing positive sizes, e.g. [384, 256, 128, 64]; got {dims}")
    return dims


def check_against_dimension(dims: list[int] | None, dimension: int, model: str) -> None:
    """Refuse sizes above the model's embedding dimension, naming the largest allowed."""
    if dims and dims[0] > dimension:
        raise FinetuneError(
            f"{dims[0]} is larger than {model}'s embedding dimension {dimension}; start the list at "
            f"{dimension} or below",
            where="recipe: loss.matryoshka_dims",
        )


def truncate(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` values of each row, renormalised (cosine similarity is what is scored)."""
    return F.normalize(embeddings[..., :dim].float(), dim=-1)


def ndcg_by_dimension(
    data,
    query_ids: Sequence[str],
    queries: torch.Tensor,
    documents: torch.Tensor,
    dims: Sequence[int],
    batch_size: int = 64,
) -> dict[str, float]:
    """NDCG@10 (cosine) of embeddings truncated to each size in ``dims``.

    Args:
        data: The retrieval set.
        query_ids: The scored split; ``queries`` holds their embeddings, row for row.
        queries: Query embeddings (the model's full size).
        documents: Embeddings of ``data.corpus`` in order.
        dims: Sizes to score.
        batch_size: The evaluator's batch size (lookups ignore it).

    Returns:
        ``{"384": 0.71, "256": 0.70, ...}`` (string keys: this goes to metrics.json).
    """
    from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate  # sentence-transformers: lazily

    texts = [data.queries[q] for q in query_ids]
    evaluator = build_evaluator(data, query_ids, "dims", batch_size=batch_size, map_at=10)
    out = {}
    for dim in dims:
        docs = truncate(documents, dim)
        lookup = EmbeddingLookup(texts, truncate(queries, dim), list(data.corpus.values()), docs)
        out[str(dim)] = evaluate(evaluator, lookup, corpus_embeddings=docs)["ndcg@10"]
    return out


def model_ndcg_by_dimension(model, data, query_ids: Sequence[str], prompts, dims, batch_size: int = 64):
    """:func:`ndcg_by_dimension` of a SentenceTransformer: queries and corpus encoded once, with the
    run's prompts as the shared evaluator passes them, then truncated to each size."""
    queries = model.encode_query(
        [data.queries[q] for q in query_ids], prompt=prompts.query, batch_size=batch_size, convert_to_tensor=True
    )
    documents = model.encode_document(
        list(data.corpus.values()), prompt=prompts.document, batch_size=batch_size, convert_to_tensor=True
    )
    return ndcg_by_dimension(data, query_ids, queries.cpu(), documents.cpu(), dims, batch_size)


def dims_line(base: dict[str, float], tuned: dict[str, float]) -> str:
    """``matryoshka NDCG@10 by size: 384 0.6734 -> 0.7325 | 256 ...`` for the run's output."""
    parts = [f"{d} {base[d]:.4f} -> {tuned[d]:.4f}" for d in base]
    return "matryoshka NDCG@10 by size (base -> tuned): " + " | ".join(parts)
