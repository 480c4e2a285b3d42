"""A toy recipe kind, written as docs/architecture.md's "Add a kind" says: a schema, field rules and a
runner in one module of its own, registered in ``finetune.kinds.KINDS`` by ``tests/test_architecture.py``.

Its "encoder" counts letters; its "training" re-weights the vowels of the query side. Nothing here
is a real method: it is the smallest kind that goes through every shared stage (validation, field
rules, run directory, evaluator, per-query rows, sweep) without any shared module knowing its name.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from finetune.atomic import write_json
from finetune.config import RecipeCore, Section
from finetune.contract import RunOptions, Start
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate
from finetune.field_rules import ALWAYS as SHARED_ALWAYS
from finetune.field_rules import SHARED_RULES, Rule
from finetune.outcome import Outcome


class ToyConfig(Section):
    weighting: Literal["none", "vowels"] = "none"
    vowel_weight: float = Field(2.0, gt=0)


class ToyRecipe(RecipeCore):
    kind: Literal["toy"]
    toy: ToyConfig = ToyConfig()


RULES = (
    *SHARED_RULES,
    Rule(
        "toy.vowel_weight",
        lambda r: r.toy.weighting == "vowels",
        "toy.weighting is vowels",
        ("toy.weighting=none", "toy.vowel_weight=3"),
    ),
    Rule("eval.also", lambda r: False, "never (the toy kind scores no extra sets)", ("eval.also=[x.jsonl]",)),
)
ALWAYS = (SHARED_ALWAYS - {"eval.also"}) | {"toy.weighting"}


def letter_counts(texts: list[str]) -> torch.Tensor:
    """``[len(texts), 26]`` letter counts, L2-normalised."""
    rows = [[t.lower().count(c) for c in string.ascii_lowercase] for t in texts]
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float) + 1e-3, dim=-1)


class ToyRun:
    """The toy kind's runner: set up, train, finish (see :mod:`finetune.contract`)."""

    def __init__(self, recipe: ToyRecipe, data, splits, device: str, cache=None, echo=print, options=RunOptions()):
        self.recipe, self.data, self.splits, self.options = recipe, data, splits, options
        self.query_texts = list(dict.fromkeys(data.queries.values()))
        self.doc_texts = [data.corpus[d] for d in data.corpus]
        self.queries, self.docs = letter_counts(self.query_texts), letter_counts(self.doc_texts)
        echo(f"toy: {len(self.query_texts)} queries and {len(self.doc_texts)} documents counted")

    def train(self, run_dir: Path, start: Start) -> None:
        self.weights = torch.ones(26)
        if self.recipe.toy.weighting == "vowels":
            self.weights[[string.ascii_lowercase.index(v) for v in "aeiou"]] = self.recipe.toy.vowel_weight

    def finish(self, run_dir: Path) -> Outcome:
        evaluator = build_evaluator(self.data, self.splits.test, "test")

        def score(transform=None):
            lookup = EmbeddingLookup(self.query_texts, self.queries, self.doc_texts, self.docs, transform)
            return evaluate(evaluator, lookup, corpus_embeddings=self.docs)

        tuned = score(lambda q: torch.nn.functional.normalize(q * self.weights, dim=-1))
        if self.options.export:
            write_json(run_dir / "toy_weights.json", self.weights.tolist())
        return Outcome(score(), tuned, record={"vowel_weight": float(self.weights[0])})
