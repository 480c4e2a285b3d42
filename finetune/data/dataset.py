"""The one internal form every data source becomes: queries, corpus, relevance, optional domains."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from finetune.errors import FinetuneError


@dataclass
class RetrievalData:
    """Queries, the whole document corpus, and which documents are relevant to which query.

    Args:
        queries: query id -> text. Only queries with at least one relevant document.
        corpus: document id -> text. Every document, relevant to some query or not.
        relevant: query id -> set of relevant document ids.
        domains: query id -> domain label (e.g. the FAQ's category), when the source has one.
        negatives: query id -> document ids given as negatives by the source.
        predefined: query id -> ``train``/``val``/``test`` when the source fixes its own split.
        source: A short description of where the data came from.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]
    domains: dict[str, str] = field(default_factory=dict)
    negatives: dict[str, list[str]] = field(default_factory=dict)
    predefined: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def check(self) -> RetrievalData:
        """Raise a :class:`FinetuneError` when the data cannot be trained or scored on."""
        where = self.source or "data"
        if not self.queries:
            raise FinetuneError(
                "no queries with a relevant document; check the file and the column names", where=where
            )
        if not self.corpus:
            raise FinetuneError("the corpus is empty", where=where)
        for qid, docs in self.relevant.items():
            if qid not in self.queries:
                raise FinetuneError(f"relevance names query '{qid}', which is not among the queries", where=where)
            missing = docs - self.corpus.keys()
            if missing:
                raise FinetuneError(
                    f"query '{qid}' is marked relevant to unknown document '{sorted(missing)[0]}'", where=where
                )
        for qid, docs in self.negatives.items():
            missing = set(docs) - self.corpus.keys()
            if missing:
                raise FinetuneError(f"query '{qid}' has unknown negative document '{sorted(missing)[0]}'", where=where)
        return self

    def fingerprint(self) -> str:
        """A hash of queries, corpus and relevance; splits files record it to catch mismatched data."""
        h = hashlib.sha256()
        for part in (self.queries, self.corpus, {q: sorted(d) for q, d in self.relevant.items()}):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    def take_queries(self, n: int) -> RetrievalData:
        """The first ``n`` queries (in source order), with the whole corpus kept."""
        keep = list(self.queries)[:n]
        return RetrievalData(
            queries={q: self.queries[q] for q in keep},
            corpus=self.corpus,
            relevant={q: self.relevant[q] for q in keep},
            domains={q: self.domains[q] for q in keep if q in self.domains},
            negatives={q: self.negatives[q] for q in keep if q in self.negatives},
            predefined={q: self.predefined[q] for q in keep if q in self.predefined},
            source=self.source,
        )

    def __repr__(self) -> str:
        return f"RetrievalData({self.source!r}, queries={len(self.queries)}, corpus={len(self.corpus)})"
