"""One side of a cross adapter: an encoder and its cached embeddings of the run's texts.

The small (document) model and the large (query) model are embedded the same way, once, through
the embedding cache: the run's distinct query texts, the corpus, and any alignment texts. Every
experiment then fits its projection over these tensors, so no cell encodes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.cache import EmbeddingCache
from finetune.cross.extra import CrossExtraSets
from finetune.models import FrozenEncoder, load_frozen_encoder

FIELDS = {"small": "document_model.name", "large": "query_model.name"}  # the recipe field each side is named by


@dataclass
class Side:
    """An encoder of a cross adapter and its embeddings (rows in the order of the texts given to :func:`embed_side`).

    Args:
        name: ``small`` (the document model, whose index never changes) or ``large`` (the query model).
        encoder: The loaded encoder (its model, prompts and source).
        queries: ``[Q, d]`` the run's distinct query texts, as queries.
        docs: ``[N, d]`` the corpus.
        texts: ``[T, d]`` the alignment texts, as documents (``[0, d]`` when there are none).
    """

    name: str
    encoder: FrozenEncoder
    queries: torch.Tensor
    docs: torch.Tensor
    texts: torch.Tensor

    @property
    def width(self) -> int:
        return self.docs.shape[1]

    def aligned_texts(self) -> torch.Tensor:
        """Every text alignment may fit on: the corpus, then the alignment texts."""
        return torch.cat([self.docs, self.texts])


def embed_side(
    name: str,
    config,
    query_texts: list[str],
    doc_texts: list[str],
    extra_texts: list[str],
    cache: EmbeddingCache,
    also: CrossExtraSets,
    device: str,
    echo=print,
) -> Side:
    """Load the encoder of ``config`` and embed the run's texts (and the ``eval.also`` sets) through ``cache``.

    Args:
        name: ``small`` or ``large``.
        config: The recipe's ``document_model`` (small) or ``query_model`` (large) section.
        query_texts, doc_texts, extra_texts: The distinct query texts, the corpus and the alignment texts.
        cache: The embedding cache (a second run with the same encoder encodes nothing).
        also: The ``eval.also`` sets, embedded here by this encoder too.
        device: Where the encoder runs.
        echo: Where the one line naming the encoder goes.

    Returns:
        The :class:`Side`.
    """
    encoder = load_frozen_encoder(config, device, field=FIELDS[name])
    encode = dict(
        model=encoder.model, identity=encoder.identity, batch_size=config.batch_size, devices=config.encode_devices
    )
    queries = cache.encode(texts=query_texts, task="query", prompt=encoder.prompts.query, **encode)
    docs = cache.encode(texts=doc_texts, task="document", prompt=encoder.prompts.document, **encode)
    texts = torch.zeros(0, docs.shape[1])
    if extra_texts:
        texts = cache.encode(texts=extra_texts, task="document", prompt=encoder.prompts.document, **encode)
    also.embed(name, encoder, cache, encode)
    echo(f"{config.name}: {encoder.source}; {encoder.prompts.describe()}")
    return Side(name, encoder, queries, docs, texts)
