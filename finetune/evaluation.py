"""The one evaluator every recipe is scored with: sentence-transformers' InformationRetrievalEvaluator.

:func:`build_evaluator` makes it from a split; :func:`evaluate` runs it and returns plain metric
names (``ndcg@10``, ``mrr@10``, ``accuracy@1`` ...). When the document side is frozen, pass the
corpus embeddings so the corpus is encoded once, not on every call; :class:`EmbeddingLookup`
lets embeddings that are already computed stand in for a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim

from finetune.data.dataset import RetrievalData
from finetune.stages import stage

STAGE_OF = {"val": "validation", "test": "test evaluation", "as_trained": "as-trained check"}
HEADLINE = ("ndcg@10", "mrr@10", "map@100", "accuracy@1", "accuracy@5", "accuracy@10", "recall@10")


class PerQueryEvaluator(InformationRetrievalEvaluator):
    """sentence-transformers' evaluator that also keeps each query's NDCG@10, reciprocal rank@10, hit@1 and recall@10.

    The per-query values are read off the very ranking the parent scores (its ``top_hits``,
    sorted the same way, ties broken by corpus id), so their means are the parent's figures
    (``tests/test_evaluation.py`` checks it). After each call, ``per_query`` maps query id to
    ``{"ndcg@10", "mrr@10", "accuracy@1", "recall@10"}``.
    """

    per_query: dict[str, dict[str, float]] = {}

    def __call__(self, model, *args, **kwargs):
        # validation inside training, the test split, and each eval.also set are stages of their own
        with stage(STAGE_OF.get(self.name, "other evaluation")):
            return super().__call__(model, *args, **kwargs)

    def compute_metrics(self, queries_result_list: list[object]):
        per_query = {}
        for itr, query_id in enumerate(self.queries_ids):
            top = sorted(queries_result_list[itr], key=lambda x: (-x["score"], x["corpus_id"]))[:10]
            relevant = self.relevant_docs[query_id]
            hits = [1 if h["corpus_id"] in relevant else 0 for h in top]
            first = next((rank for rank, hit in enumerate(hits) if hit), None)
            per_query[query_id] = {
                "ndcg@10": self.compute_dcg_at_k(hits, 10) / self.compute_dcg_at_k([1] * len(relevant), 10),
                "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
                "accuracy@1": float(bool(hits[:1] and hits[0])),
                "recall@10": sum(hits) / len(relevant),
            }
        self.per_query = per_query
        return super().compute_metrics(queries_result_list)


# Query-by-document cells one corpus chunk may hold. On a chunk with tied scores at the top-k cut (duplicate
# documents), sentence-transformers' evaluator builds two int64 tie-key matrices of queries x chunk: with its
# default 50,000-document chunk and 1,593 queries that is 1.3 GB, measured as the adapter's peak RSS at 10^5
# passages (benchmarks/README.md, Scale). Capping the cells keeps that under 256 MB whatever the corpus size,
# up to 16,777 queries; the ranking is the same (ties are broken by corpus id in any chunking). A chunk keeps
# at least 1,000 documents: the evaluator walks every query's top 100 in Python once per chunk, so ever
# smaller chunks would trade the memory for time that grows with queries x chunks.
CHUNK_CELLS = 2**24


def corpus_chunk_size(n_queries: int) -> int:
    """Documents per corpus chunk for ``n_queries`` queries: at most 50,000 (sentence-transformers' default) and
    at most :data:`CHUNK_CELLS` query-document cells, but never under 1,000 (so above 16,777 queries the cells
    exceed the cap)."""
    return max(1000, min(50_000, CHUNK_CELLS // max(1, n_queries)))


def query_chunk_size(n_documents: int) -> int:
    """Queries scored against the whole corpus at a time: a block of at most :data:`CHUNK_CELLS` query-document
    scores (64 MiB in float32), but never under 256 queries. Each block reads every corpus embedding once, so
    blocks of a few queries make a large corpus's scoring bound by memory bandwidth (16 queries a block at 10^6
    documents took 417 s against about 1 minute); 256 scores a document take less memory than the corpus's own
    384-dimensional embeddings.

    Example:
        >>> query_chunk_size(1_000), query_chunk_size(30_000), query_chunk_size(10**6)
        (16777, 559, 256)
    """
    return max(256, CHUNK_CELLS // max(1, n_documents))


class Scores(dict):
    """Metric name -> value (what :func:`evaluate` returns), with the per-query values in ``per_query``."""

    per_query: dict[str, dict[str, float]] = {}


def build_evaluator(
    data: RetrievalData,
    query_ids: Sequence[str],
    name: str = "test",
    query_prompt: str | None = None,
    batch_size: int = 64,
    corpus_prompt: str | None = None,
    map_at: int = 100,
    corpus_ids: Sequence[str] | None = None,
) -> PerQueryEvaluator:
    """An evaluator over ``query_ids`` against the whole corpus (or the documents ``corpus_ids``).

    Args:
        data: Queries, corpus and relevance.
        query_ids: The split to score (e.g. ``splits.test``).
        name: Prefix of the metric names sentence-transformers reports.
        query_prompt: Prepended to each query, if given; otherwise the model's own ``query`` prompt applies.
        batch_size: Encoding batch size.
        corpus_prompt: Prepended to each document, if given; otherwise the model's own document prompt applies.
        map_at: The MAP cut-off, which is also how deep each query's ranking is read (100 for the
            run's own table; 10 where only top-10 metrics are reported, which reads a tenth as much).
        corpus_ids: Score against these documents only (validation's candidate set,
            :mod:`finetune.candidates`); default the whole corpus.

    Returns:
        An ``InformationRetrievalEvaluator`` with accuracy/precision/recall@1,3,5,10, MRR@10, NDCG@10, MAP@``map_at``.
    """
    return PerQueryEvaluator(
        queries={q: data.queries[q] for q in query_ids},
        corpus=data.corpus if corpus_ids is None else {d: data.corpus[d] for d in corpus_ids},
        relevant_docs={q: data.relevant[q] for q in query_ids},
        accuracy_at_k=[1, 3, 5, 10],
        precision_recall_at_k=[1, 3, 5, 10],
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[map_at],
        name=name,
        query_prompt=query_prompt,
        corpus_prompt=corpus_prompt,
        corpus_chunk_size=corpus_chunk_size(len(query_ids)),
        batch_size=batch_size,
        write_csv=False,
    )


def evaluate(evaluator: InformationRetrievalEvaluator, model, corpus_embeddings: torch.Tensor | None = None) -> Scores:
    """Score ``model`` and return ``{"ndcg@10": ..., "mrr@10": ..., ...}`` (score-function prefix removed).

    With a :class:`PerQueryEvaluator` (what :func:`build_evaluator` makes), the result's
    ``per_query`` holds each query's values from the same ranking.

    Args:
        evaluator: From :func:`build_evaluator`.
        model: A ``SentenceTransformer`` or an :class:`EmbeddingLookup`.
        corpus_embeddings: Embeddings of ``evaluator.corpus`` in order; given, the corpus is not re-encoded.
    """
    if corpus_embeddings is not None and len(corpus_embeddings) != len(evaluator.corpus):
        raise ValueError(f"corpus_embeddings has {len(corpus_embeddings)} rows for {len(evaluator.corpus)} documents")
    raw = evaluator(model, corpus_embeddings=corpus_embeddings)
    prefix = f"{evaluator.name}_{model.similarity_fn_name}_" if evaluator.name else f"{model.similarity_fn_name}_"
    scores = Scores({key.removeprefix(prefix): float(value) for key, value in raw.items()})
    scores.per_query = dict(getattr(evaluator, "per_query", {}))
    return scores


class _NoModelCard:
    def set_evaluation_metrics(self, *args, **kwargs) -> None:
        pass


class EmbeddingLookup:
    """Serves precomputed embeddings through the ``encode_query``/``encode_document`` calls an evaluator makes.

    Args:
        query_texts: Texts whose embeddings are ``query_embeddings``, row for row.
        query_embeddings: Base-model query embeddings.
        document_texts: Texts whose embeddings are ``document_embeddings``.
        document_embeddings: Document embeddings.
        query_transform: Applied to query embeddings on the way out, e.g. a trained adapter
            (it receives and must return tensors on the embeddings' device).

    Example (not run: it needs a model, data or a server)::
        lookup = EmbeddingLookup(q_texts, q_emb, d_texts, d_emb, query_transform=adapter)
        evaluate(build_evaluator(data, splits.val, "val"), lookup, corpus_embeddings=d_emb)["ndcg@10"]
    """

    similarity_fn_name = "cosine"
    model_card_data = _NoModelCard()

    def __init__(
        self,
        query_texts: Sequence[str],
        query_embeddings: torch.Tensor,
        document_texts: Sequence[str] = (),
        document_embeddings: torch.Tensor | None = None,
        query_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self._queries = ({t: i for i, t in enumerate(query_texts)}, query_embeddings)
        self._documents = ({t: i for i, t in enumerate(document_texts)}, document_embeddings)
        self.query_transform = query_transform

    device = torch.device("cpu")

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cos_sim(torch.as_tensor(a), torch.as_tensor(b))

    def similarity_pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)

    def _lookup(self, table, sentences) -> torch.Tensor:
        index, embeddings = table
        if isinstance(sentences, str):
            sentences = [sentences]
        return embeddings[torch.tensor([index[s] for s in sentences], dtype=torch.long)]

    @torch.no_grad()
    def encode_query(self, sentences, **kwargs) -> torch.Tensor:
        emb = self._lookup(self._queries, sentences)
        if self.query_transform is not None:
            emb = self.query_transform(emb)
        return emb

    def encode_document(self, sentences, **kwargs) -> torch.Tensor:
        return self._lookup(self._documents, sentences)
