"""``eval.also`` for a cross adapter: the extra sets scored with the small model alone (the run's base
row), the large model alone, and the exported projection over the small model's document index.

Like the training data, each set is embedded once per encoder through the embedding cache: the
small model's documents and queries, and the large model's queries (its documents only for the
large-model-alone row).
"""

from __future__ import annotations

import torch

from finetune.cache import EmbeddingCache
from finetune.evaluation import EmbeddingLookup, evaluate
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
        self.embeddings: dict[str, list[dict[str, torch.Tensor]]] = {"small": [], "large": []}

    def embed(self, side: str, encoder: FrozenEncoder, cache: EmbeddingCache, encode: dict) -> None:
        """Embed every set's corpus and scored queries with one encoder (``side``: small or large)."""
        for x in self.sets:
            self.embeddings[side].append(
                {
                    "docs": cache.encode(
                        texts=list(x.data.corpus.values()), task="document", prompt=encoder.prompts.document, **encode
                    ),
                    "queries": cache.encode(
                        texts=x.scored_texts(), task="query", prompt=encoder.prompts.query, **encode
                    ),
                }
            )

    def score(self, projection, device: str) -> dict[str, dict]:
        """``metrics.json["also"]``: each set's base (small model), tuned (projection) and large-model rows."""

        def one(x: ExtraSet, which: str) -> dict:
            i = self.sets.index(x)
            small, large = self.embeddings["small"][i], self.embeddings["large"][i]
            queries, docs, transform = small["queries"], small["docs"], None
            if which == "large_model_alone":
                queries, docs = large["queries"], large["docs"]
            elif which == "tuned":
                queries = torch.cat([large["queries"], small["queries"]], 1) if self.both else large["queries"]
                transform = lambda q: projection(q.to(device)).cpu()  # noqa: E731
            lookup = EmbeddingLookup(x.scored_texts(), queries, list(x.data.corpus.values()), docs, transform)
            return evaluate(x.evaluator("test"), lookup, corpus_embeddings=docs)

        with torch.no_grad():
            return score_extra_sets(self.sets, one, ROWS)
