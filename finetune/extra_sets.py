"""Extra retrieval sets (``eval.also``): did fine-tuning cost retrieval outside the training data?

Each set is loaded like the recipe's own data, split with the recipe's split settings and seed,
and scored base and tuned by the same shared evaluator over its *full* corpus and its own test
split (NanoBEIR sets, a benchmark, are all test). Loading happens before the run directory is
made, so a set that fails to load stops the run with one line naming the entry and the file.

Extra sets report metrics within the top 10 only, so their evaluators read each ranking 10 deep
(MAP@10 instead of the run table's MAP@100): on Disfl-QA's 1,593 test queries that is what keeps
the extra scoring of a warm-cache adapter run small (``benchmarks/extra_sets_cost.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.config import DataConfig, SplitConfig
from finetune.data import load_data
from finetune.data.dataset import RetrievalData
from finetune.data.nanobeir import is_nanobeir, load_nanobeir
from finetune.errors import FinetuneError
from finetune.evaluation import EmbeddingLookup, PerQueryEvaluator, build_evaluator, evaluate
from finetune.splits import make_splits


@dataclass
class ExtraSet:
    """One ``eval.also`` entry, loaded and split.

    Args:
        label: A short unique name for tables (``disfl_qa``, ``construction-faq``).
        data: Its queries, corpus and relevance labels.
        val: Its validation query ids.
        test: Its test query ids (what is reported).
    """

    label: str
    data: RetrievalData
    val: list[str]
    test: list[str]
    _evaluators: dict = field(default_factory=dict, repr=False)

    def scored_texts(self) -> list[str]:
        """The texts of the val and test queries: the only ones ever scored, so the only ones embedded."""
        return list(dict.fromkeys(self.data.queries[q] for q in self.val + self.test))

    def embed(self, cache, prompts, encode: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(documents, queries)``: the full corpus and the scored queries, through the embedding cache.

        Args:
            cache: The run's :class:`~finetune.cache.EmbeddingCache`.
            prompts: The encoder's prompts (``.query``, ``.document``).
            encode: ``model``, ``identity``, ``batch_size`` and ``devices`` for ``cache.encode``.
        """
        corpus = list(self.data.corpus.values())
        return (
            cache.encode(texts=corpus, task="document", prompt=prompts.document, **encode),
            cache.encode(texts=self.scored_texts(), task="query", prompt=prompts.query, **encode),
        )

    def score_embeddings(self, queries, documents, transform=None, split: str = "test", batch_size=64) -> dict:
        """The evaluator's metrics from embeddings :meth:`embed` returned, queries through ``transform``."""
        corpus = list(self.data.corpus.values())
        lookup = EmbeddingLookup(self.scored_texts(), queries, corpus, documents, transform)
        return evaluate(self.evaluator(split, batch_size=batch_size), lookup, corpus_embeddings=documents)

    def evaluator(
        self, split: str = "test", query_prompt: str | None = None, corpus_prompt: str | None = None, batch_size=64
    ) -> PerQueryEvaluator:
        """The shared evaluator over this set's ``test`` or ``val`` queries and full corpus, built once."""
        key = (split, query_prompt, corpus_prompt, batch_size)
        if key not in self._evaluators:
            ids = self.test if split == "test" else self.val
            self._evaluators[key] = build_evaluator(
                self.data, ids, self.label, query_prompt, batch_size, corpus_prompt=corpus_prompt, map_at=10
            )
        return self._evaluators[key]


def load_extra_sets(entries: list[DataConfig], splits: SplitConfig, seed: int) -> list[ExtraSet]:
    """Load every ``eval.also`` entry; a failure names the entry (``eval.also[1]``) and its source.

    Example:
        >>> sets = load_extra_sets([DataConfig(type="builtin", name="construction-faq")], SplitConfig(), 42)
        >>> sets[0].label, len(sets[0].data.corpus), len(sets[0].test)
        ('construction-faq', 503, 101)
    """
    out: list[ExtraSet] = []
    for i, entry in enumerate(entries):
        source = entry.path or entry.name
        if is_nanobeir(source):
            try:
                nano = load_nanobeir(source)
            except FinetuneError as exc:
                raise FinetuneError(exc.message, where=f"eval.also[{i}] {source}") from None
            out += [ExtraSet(label, data, [], list(data.queries)) for label, data in nano]
            continue
        try:
            data = load_data(entry)
            split = make_splits(data, splits.model_copy(update={"file": None}), seed)
        except FinetuneError as exc:
            message = exc.message.replace("check data.path", "check the entry's path")  # it is not data.path
            raise FinetuneError(f"{exc.where + ': ' if exc.where else ''}{message}", where=f"eval.also[{i}]") from None
        except OSError as exc:
            raise FinetuneError(f"cannot read {source}: {exc.strerror or exc}", where=f"eval.also[{i}]") from None
        label = Path(str(source)).name or str(source)
        while label in {s.label for s in out}:
            label += "'"
        out.append(ExtraSet(label, data, split.val, split.test or list(data.queries)))
    return out


def score_extra_sets(
    sets: list[ExtraSet], score: Callable[[ExtraSet, str], dict], rows: tuple[str, ...] = ("base", "tuned")
) -> dict[str, dict]:
    """``{label: {source, n_test, n_corpus, base, tuned}}`` with ``score(set, "base" | "tuned")`` giving the
    evaluator's metrics on the set's test split (``rows`` names more models to score, e.g. a cross
    adapter's large model)."""
    return {
        s.label: {
            "source": s.data.source,
            "n_test": len(s.test),
            "n_corpus": len(s.data.corpus),
            **{which: dict(score(s, which)) for which in rows},  # the metrics, not per-query rows
        }
        for s in sets
    }


def extra_table(also: dict[str, dict]) -> str:
    """NDCG@10 base -> tuned on each extra set, as the lines a run prints after its own table."""
    if not also:
        return ""
    lines = ["extra sets (eval.also), test NDCG@10 over each set's full corpus:"]
    for label, r in also.items():
        base, tuned = r["base"]["ndcg@10"], r["tuned"]["ndcg@10"]
        lines.append(
            f"  {label}: {base:.4f} -> {tuned:.4f} ({tuned - base:+.4f}; {r['n_test']} queries, {r['n_corpus']} docs)"
        )
    return "\n".join(lines)
