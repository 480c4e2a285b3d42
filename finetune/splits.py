"""Seeded train/val/test splits by query, saved as ``splits.json`` so recipes share them.

Queries with identical text always land in the same split (so no test question is trained on
under another id); with ``group_by_domain`` a whole domain lands in one split.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.atomic import write_json
from finetune.config import SplitConfig
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    """Query ids per split, plus how they were made.

    Example (not run: it needs a model, data or a server)::
        splits = make_splits(data, SplitConfig(test_fraction=0.2), seed=42)
        splits.save("runs/x/splits.json")
    """

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int | None = None
    method: str = ""
    data_fingerprint: str = ""
    settings: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        path = Path(path)
        if not path.is_file():
            raise FinetuneError(
                "splits file not found; point splits.file at a splits.json from an earlier run", where=str(path)
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"malformed JSON ({exc.msg})", where=f"{path} line {exc.lineno}") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list) for k in SPLIT_NAMES):
            raise FinetuneError("a splits file needs lists 'train', 'val' and 'test' of query ids", where=str(path))
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def for_selection(self) -> Splits:
        """These splits with the validation queries standing in for the test split (a sweep point's view).

        Raises:
            FinetuneError: when there are no validation queries to choose on.
        """
        if not self.val:
            raise FinetuneError("a sweep chooses on validation queries, and these splits have none", where="splits")
        return Splits(
            self.train,
            self.val,
            list(self.val),
            self.seed,
            f"{self.method}; val scored as test",
            self.data_fingerprint,
            self.settings,
        )

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLIT_NAMES}


def make_splits(data: RetrievalData, config: SplitConfig, seed: int) -> Splits:
    """Split ``data``'s queries, or load and check ``config.file``.

    Args:
        data: The loaded data.
        config: Fractions, grouping, or an existing splits file.
        seed: Fixes the shuffle, so the same seed gives the same splits.

    Returns:
        A checked :class:`Splits`: disjoint, non-empty train and test, every id known.
    """
    if config.file:
        splits = Splits.load(config.file)
        where = config.file
        if splits.data_fingerprint and splits.data_fingerprint != data.fingerprint():
            logger.warning(
                "%s was made from different data (fingerprint %s, now %s)",
                where,
                splits.data_fingerprint,
                data.fingerprint(),
            )
    else:
        splits = _fresh_splits(data, config, seed)
        where = "splits"
    _check(splits, data, where)
    return splits


def _fresh_splits(data: RetrievalData, config: SplitConfig, seed: int) -> Splits:
    rng = random.Random(seed)
    settings = config.model_dump(exclude={"file"})
    if data.predefined and config.use_predefined:
        test = [q for q in data.queries if data.predefined.get(q) == "test"]
        val = [q for q in data.queries if data.predefined.get(q) == "val"]
        rest = [q for q in data.queries if data.predefined.get(q) not in ("test", "val")]
        if not val and config.val_fraction > 0:
            share = config.val_fraction / (1.0 - config.test_fraction)
            val, rest = _take(_groups(data, rest, config.group_by_domain), share, rng)
        return Splits(rest, val, test, seed, "predefined", data.fingerprint(), settings)
    groups = _groups(data, list(data.queries), config.group_by_domain)
    test, rest = _take(groups, config.test_fraction, rng)
    share = config.val_fraction / (1.0 - config.test_fraction)
    val, train = _take(_groups(data, rest, config.group_by_domain), share, rng)
    method = "by domain" if config.group_by_domain else "by query"
    return Splits(train, val, test, seed, method, data.fingerprint(), settings)


def _groups(data: RetrievalData, qids: list[str], by_domain: bool) -> list[list[str]]:
    """Queries that must stay together: same domain (if asked), else same text."""
    groups: dict[str, list[str]] = {}
    for qid in qids:
        key = f"domain:{data.domains[qid]}" if by_domain and qid in data.domains else f"text:{data.queries[qid]}"
        groups.setdefault(key, []).append(qid)
    return list(groups.values())


def _take(groups: list[list[str]], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Shuffle groups and move whole groups into the first part until it holds ``fraction`` of queries."""
    order = groups[:]
    rng.shuffle(order)
    total = sum(len(g) for g in groups)
    target = round(fraction * total)
    taken: list[str] = []
    rest: list[str] = []
    for group in order:
        (taken if len(taken) < target else rest).extend(group)
    return taken, rest


def _check(splits: Splits, data: RetrievalData, where: str) -> None:
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for qid in getattr(splits, name):
            if qid not in data.queries:
                raise FinetuneError(
                    f"{name} query '{qid}' is not in the data; was the file made for other data?", where=where
                )
            if qid in seen:
                raise FinetuneError(f"query '{qid}' is in both {seen[qid]} and {name}", where=where)
            seen[qid] = name
    test_texts = {data.queries[q] for q in splits.test}
    leaked = [q for q in splits.train + splits.val if data.queries[q] in test_texts]
    if leaked:
        raise FinetuneError(
            f"query '{leaked[0]}' has the same text as a test query; it must not be trained on", where=where
        )
    for name in ("train", "test"):
        if not getattr(splits, name):
            raise FinetuneError(f"the {name} split is empty; change splits.test_fraction or add queries", where=where)
