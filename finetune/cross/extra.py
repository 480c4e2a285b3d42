"""``eval.also`` for a cross adapter: the extra sets scored with the small model alone (the run's base
row), the large model alone, and the exported projection over the small model's document index.

Like the training data, each set is embedded once per encoder through the embedding cache: the
small model's documents and queries, and the large model's queries (its documents only for the
large-model-alone row).
"""

from __future__ import annotations

import torch

from finetune.cache import EmbeddingCache
from finetune.extra_sets import ExtraSet, score_extra_sets
from finetune.models import FrozenEncoder

ROWS = ("base", "tuned", "large_model_alone")


class CrossExtraSets:
    """Both encoders' cached embeddings of every ``eval.also`` set, and their scores.

    Args:
        sets: The loaded extra sets.
        both: Whether the projection reads ``[q_large; q_small]`` (``projection.input: both``).
    """

    def __init__(self, sets: list[ExtraSet], both: bool):
        self.sets, self.both = sets, both
        # side -> one (documents, queries) pair per set
        self.embeddings: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"small": [], "large": []}

    def embed(self, side: str, encoder: FrozenEncoder, cache: EmbeddingCache, encode: dict) -> None:
        """Embed every set's corpus and scored queries with one encoder (``side``: small or large)."""
        self.embeddings[side] = [x.embed(cache, encoder.prompts, encode) for x in self.sets]

    def score(self, projection, device: str) -> dict[str, dict]:
        """``metrics.json["also"]``: each set's base (small model), tuned (projection) and large-model rows."""

        def one(x: ExtraSet, which: str) -> dict:
            i = self.sets.index(x)
            small_docs, small_queries = self.embeddings["small"][i]
            large_docs, large_queries = self.embeddings["large"][i]
            if which == "large_model_alone":
                return x.score_embeddings(large_queries, large_docs)
            if which == "base":
                return x.score_embeddings(small_queries, small_docs)
            queries = torch.cat([large_queries, small_queries], 1) if self.both else large_queries
            return x.score_embeddings(queries, small_docs, lambda q: projection(q.to(device)).cpu())

        with torch.no_grad():
            return score_extra_sets(self.sets, one, ROWS)
