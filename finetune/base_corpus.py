"""The base model's corpus embeddings, computed once per run and shared.

An encoder-training run needs the unchanged checkpoint's view of the corpus three times: for the
``base`` row on the test split, for mining hard negatives, and for fixing validation's candidate
set (:mod:`finetune.candidates`). :class:`BaseCorpus` encodes the corpus once, in the order and
batches the evaluator would (so the base row is the evaluator's own figure), and serves it to all three.

Example (not run: it needs a model, data or a server)::
    base = BaseCorpus(model, data, prompts, batch_size=64)
    evaluate(build_evaluator(data, splits.test), model, corpus_embeddings=base.embeddings)
    find_negatives(data, splits.train, config, model=base.as_model())
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.cache import encode_in_chunks
from finetune.candidates import candidate_ids
from finetune.data.dataset import RetrievalData
from finetune.stages import stage


class BaseCorpus:
    """The corpus encoded once by the base model (raw, as ``encode_document`` returns it), in corpus order.

    Args:
        model: The checkpoint as ``SentenceTransformer(path)`` loads it.
        data: The run's data.
        prompts: The run's prompts (``query`` and ``document``).
        batch_size: Encoding batch size (the evaluator's).
    """

    def __init__(self, model, data: RetrievalData, prompts, batch_size: int):
        self.model, self.data, self.prompts, self.batch_size = model, data, prompts, batch_size
        self.doc_ids = list(data.corpus)
        self.embeddings = encode_corpus(model, data, prompts, batch_size)

    def as_model(self) -> KnownDocuments:
        """The base model with its document embeddings looked up instead of encoded (for mining)."""
        return KnownDocuments(self.model, [self.data.corpus[d] for d in self.doc_ids], self.embeddings)

    def candidates(self, query_ids: list[str], cap: int | str, seed: int) -> list[str] | None:
        """Validation's candidate set for ``query_ids`` (None: ``cap`` is ``all``, or the corpus fits under it)."""
        if cap == "all" or len(self.doc_ids) <= cap:
            return None
        with stage("candidate set"):
            queries = self.model.encode_query(
                [self.data.queries[q] for q in query_ids],
                prompt=self.prompts.query,
                batch_size=self.batch_size,
                convert_to_tensor=True,
            ).cpu()
            relevant = {q: self.data.relevant[q] for q in query_ids}
            return candidate_ids(self.doc_ids, relevant, queries, self.embeddings, cap, seed, self.model.similarity)


def encode_corpus(model, data: RetrievalData, prompts, batch_size: int) -> torch.Tensor:
    """The whole corpus through ``model.encode_document`` (raw, as the evaluator would encode it), in corpus
    order, a chunk at a time (:func:`~finetune.cache.encode_in_chunks`)."""
    texts = [data.corpus[d] for d in data.corpus]
    with stage("encoding"):
        kwargs = dict(prompt=prompts.document, batch_size=batch_size)
        return torch.from_numpy(encode_in_chunks(model.encode_document, texts, kwargs))


def rows_of(data: RetrievalData, embeddings: torch.Tensor, doc_ids: list[str]) -> torch.Tensor:
    """The rows of corpus-ordered ``embeddings`` for ``doc_ids``, in their order."""
    row = {d: i for i, d in enumerate(data.corpus)}
    return embeddings[torch.tensor([row[d] for d in doc_ids], dtype=torch.long)]


class KnownDocuments:
    """A model whose ``encode_document`` returns embeddings already computed; everything else is the model's.

    Documents are looked up by text, and normalised or converted as the call asks, so
    sentence-transformers' ``mine_hard_negatives`` sees what encoding them again would give.
    """

    def __init__(self, model, texts: list[str], embeddings: torch.Tensor):
        self._model, self._row = model, {}
        for i, text in enumerate(texts):
            self._row.setdefault(text, i)
        self._embeddings = embeddings

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_document(self, sentences, normalize_embeddings: bool = False, convert_to_tensor: bool = False, **kw):
        single = isinstance(sentences, str)
        rows = self._embeddings[torch.tensor([self._row[s] for s in ([sentences] if single else sentences)])]
        if normalize_embeddings:
            rows = torch.nn.functional.normalize(rows, p=2, dim=1)
        rows = rows[0] if single else rows
        return rows if convert_to_tensor else np.asarray(rows.numpy())
