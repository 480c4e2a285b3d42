"""Negative sampling for adapter training, vectorised over a batch.

Relevance is kept as sorted ``query_row * n_docs + doc_row`` keys, so checking "is this document
relevant to this query" is one ``torch.isin`` call and scales to large corpora (no dense matrix).
"""

from __future__ import annotations

import torch

from finetune.errors import FinetuneError


def top_k_negatives(queries: torch.Tensor, documents: torch.Tensor, relevant: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """``[Q, k]`` rows of the ``k`` documents most similar to each query that are not relevant to it.

    Args:
        queries: ``[Q, d]`` normalised query embeddings in the document index's space.
        documents: ``[N, d]`` normalised document embeddings (the frozen index).
        relevant: Keys from :func:`relevance_keys`.
        k: Negatives per query (at most ``N - 1``).
    """
    n = len(documents)
    k = min(k, n - 1)
    relevant, documents_t = relevant.cpu(), documents.cpu().T
    out = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk].cpu() @ documents_t
        mine = relevant[(relevant >= start * n) & (relevant < (start + len(scores)) * n)] - start * n
        scores.view(-1)[mine] = float("-inf")
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


def relevant_pairs(data, query_ids, row_of_text: dict[str, int], row_of_doc: dict[str, int]) -> torch.Tensor:
    """``[P, 2]`` (query row, document row) for every relevant document of ``query_ids``.

    Rows index the embedding tables: queries by text (identical texts share a row), documents by id.
    """
    pairs = [(row_of_text[data.queries[q]], row_of_doc[d]) for q in query_ids for d in sorted(data.relevant[q])]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def given_negatives(data, row_of_text: dict[str, int], row_of_doc: dict[str, int]) -> torch.Tensor:
    """``[Q, G]`` document rows the data names as negatives per query row, ``-1`` padded."""
    width = max(len(v) for v in data.negatives.values())
    given = torch.full((len(row_of_text), width), -1, dtype=torch.long)
    for qid, docs in data.negatives.items():
        given[row_of_text[data.queries[qid]], : len(docs)] = torch.tensor([row_of_doc[d] for d in docs])
    return given


def relevance_keys(pairs: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Sorted unique keys ``q * n_docs + d`` of every relevant (query row, doc row) pair in ``pairs [P, 2]``."""
    return torch.unique(pairs[:, 0] * n_docs + pairs[:, 1])


class NegativeSampler:
    """Draws ``k`` negatives per query.

    Args:
        documents: ``[N, d]`` corpus embeddings.
        relevant: Keys from :func:`relevance_keys` over all labelled pairs (every split's labels
            may be given: they are used only to avoid drawing a relevant document as a negative).
        pool: ``[M, d]`` embeddings of unrelated texts to draw from instead of the corpus.
        given: ``[Q, G]`` document rows the data names as negatives per query row, ``-1`` padded.

    Example:
        >>> sampler = NegativeSampler(doc_emb, relevance_keys(pairs, len(doc_emb)))
        >>> emb, rows = sampler.sample(torch.tensor([0, 1]), k=2, generator=torch.Generator().manual_seed(0))
        >>> emb.shape
        torch.Size([2, 2, 384])
    """

    def __init__(self, documents: torch.Tensor, relevant: torch.Tensor, pool: torch.Tensor | None = None, given: torch.Tensor | None = None):
        # relevance keys stay on the CPU: the binary search below runs there (train moves a copy)
        self.documents, self.relevant, self.pool, self.given = documents, relevant.cpu(), pool, given

    def sample(self, query_rows: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(embeddings [B, k, d], document rows [B, k])``; rows are ``-1`` for pool texts."""
        shape = (len(query_rows), k)
        if self.pool is not None:
            rows = torch.randint(len(self.pool), shape, generator=generator)
            return self.pool[rows.to(self.pool.device)], torch.full(shape, -1, dtype=torch.long)
        rows = self._random_corpus(query_rows.cpu(), shape, generator)
        if self.given is not None:
            given = self.given[query_rows.cpu()]
            counts = (given >= 0).sum(1, keepdim=True)
            pick = (torch.rand(shape, generator=generator) * counts.clamp(min=1)).long()
            chosen = given.gather(1, pick)
            rows = torch.where(counts > 0, chosen, rows)
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
                raise FinetuneError(f"query row {q} is relevant to every document; no negative can be drawn", where="negatives")
            rows[i, j] = choices[torch.randint(len(choices), (1,), generator=generator)]
        return rows
