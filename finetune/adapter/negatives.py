"""Negative sampling for adapter training, vectorised over a batch.

Relevance is kept as sorted ``query_row * n_docs + doc_row`` keys, so checking "is this document
relevant to this query" is a binary search and scales to large corpora (no dense matrix).
"""

from __future__ import annotations

import torch

from finetune.errors import FinetuneError


def relevant_pairs(data, query_ids, row_of_text: dict[str, int], row_of_doc: dict[str, int]) -> torch.Tensor:
    """``[P, 2]`` (query row, document row) for every relevant document of ``query_ids``.

    Rows index the embedding tables: queries by text (identical texts share a row), documents by id.
    """
    pairs = [(row_of_text[data.queries[q]], row_of_doc[d]) for q in query_ids for d in sorted(data.relevant[q])]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def negatives_table(
    negatives: dict[str, list[str]], data, row_of_text: dict[str, int], row_of_doc: dict[str, int]
) -> torch.Tensor:
    """``[Q, G]`` document rows named as negatives per query row, ``-1`` padded.

    Args:
        negatives: query id -> negative document ids (the data's negative column, or mined ones).
    """
    width = max(len(v) for v in negatives.values())
    table = torch.full((len(row_of_text), width), -1, dtype=torch.long)
    for qid, docs in negatives.items():
        table[row_of_text[data.queries[qid]], : len(docs)] = torch.tensor(
            [row_of_doc[d] for d in docs], dtype=torch.long
        )
    return table


def relevance_keys(pairs: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Sorted unique keys ``q * n_docs + d`` of every relevant (query row, doc row) pair in ``pairs [P, 2]``."""
    return torch.unique(pairs[:, 0] * n_docs + pairs[:, 1])


class NegativeSampler:
    """Draws ``per_query`` negatives per query.

    Args:
        documents: ``[N, d]`` corpus embeddings.
        per_query: Negatives per query and step.
        relevant: Keys from :func:`relevance_keys` over all labelled pairs (every split's labels
            may be given: they are used only to avoid drawing a relevant document as a negative).
        pool: ``[M, d]`` embeddings of unrelated texts to draw from instead of the corpus.
        given: ``[Q, G]`` document rows named as negatives per query row, ``-1`` padded (the
            data's negative column, or mined/BM25 negatives). With ``G == per_query`` each slot
            takes its column; otherwise each slot draws one of the row's at random. Empty slots
            fall back to random corpus documents.

    Example (not run: it needs a model, data or a server)::
        sampler = NegativeSampler(doc_emb, relevance_keys(pairs, len(doc_emb)), per_query=2)
        emb, rows = sampler.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
        emb.shape
        torch.Size([2, 2, 384])
    """

    def __init__(
        self,
        documents: torch.Tensor,
        relevant: torch.Tensor,
        per_query: int = 1,
        pool: torch.Tensor | None = None,
        given: torch.Tensor | None = None,
    ):
        # relevance keys stay on the CPU: the binary search below runs there (train moves a copy)
        self.documents, self.relevant, self.pool, self.given = documents, relevant.cpu(), pool, given
        self.per_query = per_query

    def sample(self, query_rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(embeddings [B, k, d], document rows [B, k])``; rows are ``-1`` for pool texts."""
        shape = (len(query_rows), self.per_query)
        if self.pool is not None:
            rows = torch.randint(len(self.pool), shape, generator=generator)
            return self.pool[rows.to(self.pool.device)], torch.full(shape, -1, dtype=torch.long)
        rows = self._random_corpus(query_rows.cpu(), shape, generator)
        if self.given is not None:
            given = self.given[query_rows.cpu()]
            if given.shape[1] == self.per_query:
                chosen = given
            else:
                counts = (given >= 0).sum(1, keepdim=True)
                pick = (torch.rand(shape, generator=generator) * counts.clamp(min=1)).long()
                chosen = given.gather(1, pick)
            rows = torch.where(chosen >= 0, chosen, rows)
        return self.documents[rows.to(self.documents.device)], rows

    def _is_relevant(self, keys: torch.Tensor) -> torch.Tensor:
        # the keys are sorted, so a binary search beats torch.isin's hashing at every step
        relevant = self.relevant
        if len(relevant) == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        at = torch.searchsorted(relevant, keys).clamp(max=len(relevant) - 1)
        return relevant[at] == keys

    def _random_corpus(self, query_rows: torch.Tensor, shape, generator) -> torch.Tensor:
        n = len(self.documents)
        rows = torch.randint(n, shape, generator=generator)
        for _ in range(20):  # redraw the few that hit a relevant document
            bad = self._is_relevant(query_rows[:, None] * n + rows)
            if not bad.any():
                return rows
            rows[bad] = torch.randint(n, (int(bad.sum()),), generator=generator)
        relevant = self.relevant
        # queries relevant to most of the corpus: draw from their non-relevant documents directly
        for i, j in torch.nonzero(self._is_relevant(query_rows[:, None] * n + rows)).tolist():
            q = int(query_rows[i])
            mine = relevant[(relevant >= q * n) & (relevant < (q + 1) * n)] - q * n
            allowed = torch.ones(n, dtype=torch.bool)
            allowed[mine] = False
            choices = torch.nonzero(allowed).flatten()
            if len(choices) == 0:
                raise FinetuneError(
                    f"query row {q} is relevant to every document; no negative can be drawn", where="negatives"
                )
            rows[i, j] = choices[torch.randint(len(choices), (1,), generator=generator)]
        return rows


def build_sampler(
    data,
    config,
    documents: torch.Tensor,
    row_of_text: dict[str, int],
    row_of_doc: dict[str, int],
    train_ids: list[str],
    lookup,
    seed: int,
    pool: torch.Tensor | None = None,
) -> tuple[NegativeSampler, dict]:
    """The sampler a frozen-encoder recipe's ``negatives`` section asks for, and how its negatives were found.

    Args:
        data: The recipe's data.
        config: Its :class:`~finetune.config.NegativesConfig`.
        documents: ``[N, d]`` the frozen document index (rows as ``row_of_doc``).
        row_of_text, row_of_doc: Embedding-table rows of query texts and document ids.
        train_ids: Queries mined/BM25 negatives are found for.
        lookup: An ``EmbeddingLookup`` over the base model's cached embeddings (``mined``).
        seed: Fixes mining's random choices.
        pool: ``[M, d]`` unrelated texts (``pool: file``).

    Returns:
        ``(sampler, stats)``; for ``strategy: none`` the sampler draws nothing (in-batch negatives only).
    """
    from finetune.mining import find_negatives, require_given_column

    require_given_column(data, config)
    # every labelled pair, test included, only to avoid drawing a relevant document as a negative
    relevant = relevance_keys(relevant_pairs(data, list(data.queries), row_of_text, row_of_doc), len(row_of_doc))
    given, stats = None, {"strategy": config.strategy}
    if config.strategy == "given":
        given = negatives_table(data.negatives, data, row_of_text, row_of_doc)
    elif config.strategy in ("mined", "bm25"):
        mined = find_negatives(data, train_ids, config, model=lookup, seed=seed)
        given, stats = negatives_table(mined.by_query, data, row_of_text, row_of_doc), mined.stats
    per_query = 0 if config.strategy == "none" else config.per_query
    return NegativeSampler(documents, relevant, per_query, pool=pool, given=given), stats
