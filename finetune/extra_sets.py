"""Extra retrieval sets (``eval.also``): did fine-tuning cost retrieval outside the training data?

Each set is loaded like the recipe's own data, split with the recipe's split settings and seed,
and scored base and tuned by the same shared evaluator over its *full* corpus and its own test
split. Loading happens before the run directory is made, so a set that fails to load stops the run
with one line naming the entry and the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.config import DataConfig, SplitConfig
from finetune.data import load_data
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.splits import make_splits

_NANOBEIR = (
    "NanoBEIR is downloaded from the Hugging Face Hub, and this toolkit does not fetch it (the Hub is often "
    "unreachable, as on this project's machines); save its sets as BEIR folders and list those paths instead"
)


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
        if str(source).lower().split(":")[0] == "nanobeir":
            raise FinetuneError(_NANOBEIR, where=f"eval.also[{i}] {source}")
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


def score_extra_sets(sets: list[ExtraSet], score: Callable[[ExtraSet, str], dict]) -> dict[str, dict]:
    """``{label: {source, n_test, n_corpus, base, tuned}}`` with ``score(set, "base" | "tuned")`` giving the
    evaluator's metrics on the set's test split."""
    return {
        s.label: {
            "source": s.data.source,
            "n_test": len(s.test),
            "n_corpus": len(s.data.corpus),
            **{which: dict(score(s, which)) for which in ("base", "tuned")},  # the metrics, not per-query rows
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
