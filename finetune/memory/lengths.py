"""The longest text of each training column, in tokens: what a training step pads to.

sentence-transformers tokenizes each column of a batch on its own (the anchors, the positives, each
negative column) and pads it to its longest text, so the step that holds a column's longest text is
that column's peak. The memory plan counts each column at that length instead of the model's
``max_seq_length`` for every text: Disfl-QA's queries stop at 145 tokens beside paragraphs cut at
256, and the FAQ's documents stop at 117 (all-MiniLM-L6-v2's tokenizer).

Only the longest texts by characters are tokenized (:data:`SAMPLE` a column): tokens follow
characters closely, and a plan should not tokenize a corpus of 10^5 passages.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

SAMPLE = 512  # texts tokenized per column, the longest by characters


@dataclass(frozen=True)
class ColumnLengths:
    """Tokens of the longest anchor, positive and negative (0: no negative column), prompts included."""

    anchor: int
    positive: int
    negative: int

    def columns(self, negatives: int, cap: int) -> tuple[int, ...]:
        """Per column of a step with ``negatives`` negative columns, each cut at ``cap`` tokens."""
        return tuple(min(n, cap) for n in (self.anchor, self.positive, *(self.negative,) * negatives))


def longest_tokens(model, texts: Iterable[str], prompt: str | None = None, sample: int = SAMPLE) -> int:
    """Tokens of the longest of ``texts`` as ``model`` pads a batch of them.

    Args:
        model: A ``SentenceTransformer``; its own ``preprocess`` (prompt, special tokens, ``max_seq_length`` cut).
        texts: The column's texts.
        prompt: The column's prompt, given to ``preprocess`` as the trainer gives it.
        sample: How many of the longest texts by characters are tokenized.

    Returns:
        The padded length of a batch of those texts; 0 for no texts.

    Example:
        >>> from finetune.memory.lengths import longest_tokens
        >>> class Words:  # a stand-in model: one token a word, plus two special tokens
        ...     def preprocess(self, texts, prompt=None):
        ...         import torch
        ...         words = max(len(((prompt or "") + t).split()) for t in texts)
        ...         return {"input_ids": torch.zeros(len(texts), 2 + words)}
        >>> longest_tokens(Words(), ["a b c", "a b c d e"], prompt="query: ")
        8
    """
    longest = heapq.nlargest(sample, texts, key=len)
    if not longest:
        return 0
    return int(model.preprocess(longest, prompt=prompt)["input_ids"].shape[1])


def column_lengths(model, prompts, data, train_ids: list[str], negatives: bool = True) -> ColumnLengths:
    """The longest training anchor, positive and negative of a run, as ``model`` tokenizes them.

    Args:
        model: The run's ``SentenceTransformer``.
        prompts: The run's :class:`~finetune.prompts.Prompts` (query prompt on anchors, document prompt on the rest).
        data: The run's :class:`~finetune.data.dataset.RetrievalData`.
        train_ids: The training queries.
        negatives: Whether the step has negative columns; without, the corpus is not read (0).

    Returns:
        :class:`ColumnLengths`; negatives are any corpus document (mined or given), so theirs is the corpus's longest.
    """
    positives = (data.corpus[d] for q in train_ids for d in data.relevant[q])
    return ColumnLengths(
        anchor=longest_tokens(model, (data.queries[q] for q in train_ids), prompts.query),
        positive=longest_tokens(model, positives, prompts.document),
        negative=longest_tokens(model, data.corpus.values(), prompts.document) if negatives else 0,
    )
