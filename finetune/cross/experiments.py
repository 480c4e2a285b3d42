"""Which queries each cross-adapter experiment trains, validates and tests on.

An :class:`Experiment` is a set of query ids, nothing else, so the rules that keep test queries out
of training can be checked on their own: label budgets take nested, seeded fractions of the fixed
train and val splits; leave-one-domain-out tests on one domain and trains on the rest; per-domain
trains inside one domain and tests inside and outside it. Query texts equal to a test query's are
never trained on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.splits import Splits


@dataclass
class Experiment:
    """Query ids for one training run and the test sets it is scored on.

    Args:
        name: e.g. ``ratio=0.1`` or ``lodo:Roofing``.
        group: ``budget``, ``lodo`` or ``per_domain``.
        train: Labelled queries for label training.
        val: Labelled queries for early stopping (may be empty).
        tests: Test-set name -> query ids.
        unlabelled: Queries whose *text* alignment may use (never their labels).
        ratio: The label budget, for ``budget`` experiments.
        domain: The domain, for domain experiments.
    """

    name: str
    group: str
    train: list[str]
    val: list[str]
    tests: dict[str, list[str]]
    unlabelled: list[str] = field(default_factory=list)
    ratio: float | None = None
    domain: str | None = None


def budget_experiments(splits: Splits, ratios: list[float], seed: int) -> list[Experiment]:
    """One experiment per ratio: the first ``ceil(ratio * n)`` of the seeded-shuffled train and val
    queries, so a larger budget contains every smaller one; the test split is the same for all."""
    rng = random.Random(seed)
    train, val = splits.train[:], splits.val[:]
    rng.shuffle(train)
    rng.shuffle(val)
    unlabelled = splits.train + splits.val
    return [
        Experiment(
            f"ratio={r:g}",
            "budget",
            train[: max(1, math.ceil(r * len(train)))],
            val[: math.ceil(r * len(val))],
            {"test": splits.test},
            unlabelled,
            ratio=r,
        )
        for r in ratios
    ]


def _domains(data: RetrievalData, min_queries: int, where: str) -> dict[str, list[str]]:
    if not data.domains:
        raise FinetuneError(
            "domain experiments need a domain column; set data.columns.domain (the FAQ has 'category')", where=where
        )
    by_domain: dict[str, list[str]] = {}
    for qid in data.queries:
        if qid in data.domains:
            by_domain.setdefault(data.domains[qid], []).append(qid)
    kept = {d: q for d, q in sorted(by_domain.items()) if len(q) >= min_queries}
    if not kept:
        raise FinetuneError(f"no domain has {min_queries} or more queries; lower domains.min_queries", where=where)
    return kept


def _without_texts(data: RetrievalData, ids: list[str], banned: list[str]) -> list[str]:
    texts = {data.queries[q] for q in banned}
    return [q for q in ids if data.queries[q] not in texts]


def _split(ids: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(taken, rest) with ``round(fraction * n)`` taken, at least one of each when n >= 2."""
    ids = ids[:]
    rng.shuffle(ids)
    k = min(max(1, round(fraction * len(ids))), len(ids) - 1) if len(ids) > 1 else 0
    return ids[:k], ids[k:]


def leave_one_domain_out(data: RetrievalData, min_queries: int, val_fraction: float, seed: int) -> list[Experiment]:
    """For each domain: test on all of its queries, train (and validate) on every other domain's."""
    domains = _domains(data, min_queries, "domains.leave_one_domain_out")
    rng = random.Random(seed)
    out = []
    for domain, held_out in domains.items():
        rest = _without_texts(data, [q for q in data.queries if data.domains.get(q) != domain], held_out)
        val, train = _split(rest, val_fraction, rng) if val_fraction > 0 else ([], rest)
        out.append(
            Experiment(f"lodo:{domain}", "lodo", train, val, {"held-out domain": held_out}, rest, domain=domain)
        )
    return out


def per_domain(data: RetrievalData, min_queries: int, test_fraction: float, seed: int) -> list[Experiment]:
    """For each domain: train on part of its queries, test on the rest of it and on all other domains."""
    domains = _domains(data, min_queries, "domains.per_domain")
    rng = random.Random(seed)
    out = []
    for domain, ids in domains.items():
        test, train = _split(ids, test_fraction, rng)
        train = _without_texts(data, train, test)
        others = _without_texts(data, [q for q in data.queries if data.domains.get(q) != domain], train)
        out.append(
            Experiment(
                f"domain:{domain}",
                "per_domain",
                train,
                [],
                {"in-domain": test, "other domains": others},
                train,
                domain=domain,
            )
        )
    return out
