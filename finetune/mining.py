"""Hard negatives found once before training: mined with the base model, or ranked by BM25.

Both recipe families use the result: the QLoRA recipe adds ``negative_1..k`` columns to its
(anchor, positive) dataset for MultipleNegativesRankingLoss; the adapter recipes hand the table
to their negative sampler. Queries for which too few candidates survive the filters get random
non-relevant documents for the remaining slots (counted in the returned stats).

- ``mined``: sentence-transformers' ``mine_hard_negatives`` with the recipe's base model (or, for
  frozen-encoder recipes, the cached embeddings served through
  :class:`~finetune.evaluation.EmbeddingLookup`, so nothing is encoded twice).
- ``bm25``: `bm25s <https://github.com/xhluca/bm25s>`_, chosen because it is maintained (releases
  through 2026), depends only on NumPy, and scores with sparse matrices, so a 100k-document corpus
  indexes in seconds; ``rank-bm25`` has had no release since 2022 and scores query by query in
  Python.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from finetune.config import NegativesConfig
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.stages import stage

logger = logging.getLogger(__name__)


@dataclass
class MinedNegatives:
    """``per_query`` negative document ids for each query id, and how they were found."""

    by_query: dict[str, list[str]]
    stats: dict = field(default_factory=dict)


def require_given_column(data: RetrievalData, config: NegativesConfig) -> None:
    """``strategy: given`` needs the data's negative column; say so before anything runs."""
    if config.strategy == "given" and not data.negatives:
        raise FinetuneError(
            "strategy 'given' needs a negative column; set data.columns.negative", where="recipe: negatives.strategy"
        )


def find_negatives(
    data: RetrievalData,
    query_ids: list[str],
    config: NegativesConfig,
    model=None,
    seed: int = 0,
    batch_size: int = 64,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
) -> MinedNegatives:
    """``per_query`` negatives for each of ``query_ids`` by ``config.strategy``.

    ``mined`` and ``bm25`` rank the corpus; ``given`` takes the data's negative column; ``random``
    draws non-relevant corpus documents (once: a fixed negative per example, as a dataset column).

    Args:
        data: Queries, corpus and relevance; a query's relevant documents are never its negatives.
        query_ids: The queries to find negatives for (the train split).
        config: The recipe's ``negatives`` section.
        model: For ``mined``: anything with ``encode_query``/``encode_document`` and ``similarity``
            (a ``SentenceTransformer``, or an ``EmbeddingLookup`` over cached embeddings).
        seed: Fixes random sampling and the random fill.
        batch_size, query_prompt, document_prompt: Encoding settings for ``mined``.

    Returns:
        :class:`MinedNegatives`: query id -> ``config.per_query`` document ids.

    Example (not run: it needs a model, data or a server)::
        mined = find_negatives(data, splits.train, NegativesConfig(strategy="bm25", per_query=2))
        len(mined.by_query[splits.train[0]])
        2
    """
    if not query_ids:
        raise FinetuneError("no training queries to find negatives for", where="negatives")
    with stage("mining"):
        return _find(data, query_ids, config, model, seed, batch_size, query_prompt, document_prompt)


def _find(data, query_ids, config, model, seed, batch_size, query_prompt, document_prompt) -> MinedNegatives:
    if config.strategy == "mined":
        if model is None:
            raise ValueError("mined negatives need a model")
        ranked = _dense_candidates(data, query_ids, config, model, batch_size, query_prompt, document_prompt)
    elif config.strategy == "bm25":
        ranked = _bm25_candidates(data, query_ids, config, seed)
    elif config.strategy == "given":
        require_given_column(data, config)
        ranked = data.negatives
    elif config.strategy == "random":
        ranked = {}
    else:
        raise ValueError(f"strategy {config.strategy!r} finds no negatives")
    return _fill(data, query_ids, ranked, config, seed)


def _dense_candidates(
    data, query_ids, config, model, batch_size, query_prompt, document_prompt
) -> dict[str, list[str]]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from finetune.evaluation import query_chunk_size

    rows = [(data.queries[q], data.corpus[d]) for q in query_ids for d in sorted(data.relevant[q])]
    corpus_texts = list(dict.fromkeys(data.corpus.values()))
    doc_of_text = {}
    for did, text in data.corpus.items():
        doc_of_text.setdefault(text, did)
    n_candidates = min(window_end(config), len(corpus_texts) - 1) - config.range_min
    if n_candidates < 1:
        raise FinetuneError(
            f"the corpus has {len(corpus_texts)} documents, too few to skip range_min={config.range_min}",
            where="negatives.range_min",
        )
    mined = mine_hard_negatives(
        Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]}),
        model,
        corpus=corpus_texts,
        range_min=config.range_min,
        range_max=config.range_min + n_candidates,
        relative_margin=config.relative_margin,
        max_score=config.max_score,
        num_negatives=min(config.per_query, n_candidates),
        sampling_strategy=config.sampling,
        query_prompt=query_prompt,
        corpus_prompt=document_prompt,
        output_format="labeled-list",
        batch_size=batch_size,
        # its default scores 16,384 queries at once against the whole corpus: 2.1 GiB more RSS for
        # 5,579 training queries at 10^5 documents, 21 GiB at 10^6
        faiss_batch_size=query_chunk_size(len(corpus_texts)),
        verbose=False,
    )
    by_text: dict[str, list[str]] = {}
    for anchor, docs, labels in zip(mined["anchor"], mined["positive"], mined["labels"]):
        found = by_text.setdefault(anchor, [])
        found += [doc_of_text[t] for t, label in zip(docs, labels) if label == 0 and doc_of_text[t] not in found]
    return {q: by_text.get(data.queries[q], []) for q in query_ids}


def _bm25_candidates(data, query_ids, config, seed: int) -> dict[str, list[str]]:
    try:
        import bm25s
    except ImportError:
        raise FinetuneError(
            "negatives.strategy 'bm25' needs bm25s; pip install bm25s", where="recipe: negatives.strategy"
        ) from None
    doc_ids = list(data.corpus)
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([data.corpus[d] for d in doc_ids], stopwords="en", show_progress=False), show_progress=False
    )
    texts = [data.queries[q] for q in query_ids]
    depth = window_end(config)
    # the positives may rank inside the window: fetch that many more, and skip them below
    widest = max(len(data.relevant[q]) for q in query_ids)
    k = min(len(doc_ids), depth + widest)
    hits, scores = retriever.retrieve(
        bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False), k=k, show_progress=False
    )
    rng = random.Random(seed)
    out = {}
    for q, row, score in zip(query_ids, hits, scores):
        positives = data.relevant[q]
        positive_texts = {data.corpus[d].strip().lower() for d in positives}
        ranked = [
            doc_ids[int(i)]
            for i, s in zip(row, score)
            if s > 0
            and doc_ids[int(i)] not in positives
            and data.corpus[doc_ids[int(i)]].strip().lower() not in positive_texts
        ]
        window = ranked[config.range_min : depth]
        out[q] = (
            window[: config.per_query]
            if config.sampling == "top"
            else rng.sample(window, min(config.per_query, len(window)))
        )
    return out


def window_end(config: NegativesConfig) -> int:
    """The last rank mined or BM25 negatives are taken from: ``range_max``, else 10 per negative asked."""
    return config.range_max or config.range_min + 10 * config.per_query


def _fill(data, query_ids, ranked: dict[str, list[str]], config, seed: int) -> MinedNegatives:
    """Top up each query to ``per_query`` negatives with random non-relevant documents."""
    rng = random.Random(seed)
    doc_ids = list(data.corpus)
    by_query, filled = {}, 0
    for q in query_ids:
        chosen = list(ranked.get(q, []))[: config.per_query]
        if len(doc_ids) - len(data.relevant[q]) < config.per_query:
            raise FinetuneError(
                f"query '{q}' has fewer than per_query={config.per_query} non-relevant documents",
                where="negatives.per_query",
            )
        while len(chosen) < config.per_query:
            d = rng.choice(doc_ids)
            if d not in data.relevant[q] and d not in chosen:
                chosen.append(d)
                filled += 1
        by_query[q] = chosen
    stats = {
        "strategy": config.strategy,
        "queries": len(query_ids),
        "per_query": config.per_query,
        "filled_random": filled,
    }
    logger.info(
        "%s negatives: %d queries x %d; %d slot(s) filled at random%s",
        config.strategy,
        len(query_ids),
        config.per_query,
        filled,
        _why_random(config, filled, len(query_ids)),
    )
    return MinedNegatives(by_query, stats)


def _why_random(config: NegativesConfig, filled: int, queries: int) -> str:
    """Why mining left slots to chance, and the setting that changes it (more distractors leave more)."""
    if not filled or config.strategy != "mined":
        return ""
    return (
        f" ({100 * filled / (queries * config.per_query):.0f}%): the nearest candidates, ranks {config.range_min} "
        f"to about {window_end(config)}, held too few below negatives.relative_margin and negatives.max_score; "
        "a larger negatives.range_max looks further down"
    )
