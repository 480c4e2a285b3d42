"""No setting is silently ignored: a field set to a value the resolved recipe would not use is an error.

Many fields only matter under some value of another field: ``negatives.range_min`` only for mined
or BM25 negatives, ``data.path`` not for builtin data, ``lora.*`` not for full fine-tuning. A user
who sets one of them expects an effect; a run that ignores it prints numbers for a recipe they did
not write. :func:`check_fields` refuses a recipe in which such a field holds anything but its
default, naming the field, when it applies, and the fix.

This module is the engine and the rules of the sections several kinds share (data, splits,
negatives, model, cache, merge). Each kind's own rules live beside its schema (``<kind>/rules.py``:
``RULES``, and ``ALWAYS`` for the fields that always act), named by its :class:`~finetune.kinds.RecipeKind`.
``tests/test_field_rules.py`` enumerates every kind's schema, so a new field cannot skip the rule,
and runs each rule's witness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Rule:
    """``path`` has an effect only when ``applies(recipe)``; ``when`` says so in words.

    ``witness`` is a list of overrides under which the field is set but has no effect (the test
    runs it and expects this rule's error); ``fix`` is the advice after "remove it".
    """

    path: str
    applies: Callable[[BaseModel], bool]
    when: str
    witness: tuple[str, ...]
    fix: str = ""


def negatives_in(*strategies: str) -> Callable[[BaseModel], bool]:
    return lambda r: r.negatives.strategy in strategies


def validates(r) -> bool:
    """The run will have validation queries: a fraction, a splits file, or a BEIR folder's own dev split."""
    return r.splits.val_fraction > 0 or bool(r.splits.file) or (r.data.type == "beir" and r.splits.use_predefined)


VALIDATES = "the run has validation queries (splits.val_fraction above 0, a splits.file, or a BEIR dev split)"


def model_rules(section: str, frozen: bool) -> tuple[Rule, ...]:
    """A model section's rules: API fields only for an API model; a ``frozen`` encoder (one that only
    encodes) may be an API model, whose local-only fields are then refused."""
    api, local = "provider is openai_compatible", "provider is local"

    def remote(r):
        return getattr(r, section).provider == "openai_compatible"

    rules = [
        Rule(f"{section}.{f}", remote, f"{section}.{api}", (f"{section}.{f}={v}",))
        for f, v in (
            ("base_url", "http://127.0.0.1:9/v1"),
            ("dimensions", 64),
            ("api_key_env", "MY_KEY"),
            ("timeout", 5),
            ("max_retries", 1),
        )
    ]
    if frozen:
        api_model = (f"{section}.provider=openai_compatible", f"{section}.base_url=http://127.0.0.1:9/v1")
        rules += [
            Rule(f"{section}.{f}", lambda r: not remote(r), f"{section}.{local}", (*api_model, f"{section}.{f}={v}"))
            for f, v in (("max_seq_length", 64), ("trust_remote_code", "true"), ("encode_devices", "[cpu]"))
        ]
    return tuple(rules)


SHARED_RULES: tuple[Rule, ...] = (
    # data: what each source type reads
    Rule(
        "data.name",
        lambda r: r.data.type in ("builtin", "hf") and not (r.data.type == "hf" and r.data.path),
        "data.type is builtin, or hf without a path",
        ("data.type=pairs", "data.path=x.jsonl", "data.name=construction-faq"),
        "or pass data=NAME to read that data",
    ),
    Rule(
        "data.path",
        lambda r: r.data.type in ("pairs", "beir", "hf"),
        "data.type is pairs, beir or hf",
        ("data.type=builtin", "data.path=elsewhere.jsonl"),
        "or pass data=PATH to read that file or folder instead",
    ),
    Rule("data.split", lambda r: r.data.type == "hf", "data.type is hf", ("data.split=train",)),
    Rule(
        "data.columns",
        lambda r: r.data.type in ("pairs", "hf"),
        "data.type is pairs or hf (builtin and BEIR data have fixed fields)",
        ("data.columns.query=question",),
    ),
    Rule(
        "data.columns.negative",
        lambda r: r.negatives.strategy == "given",
        "negatives.strategy is given",
        (
            "data.type=pairs",
            "data.name=null",
            "data.path=x.jsonl",
            "data.columns.negative=neg",
            "negatives.strategy=random",
        ),
        "or set negatives.strategy=given",
    ),
    # splits: a splits file replaces the fractions
    *(
        Rule(
            f"splits.{f}",
            lambda r: not r.splits.file,
            "splits.file is not set (a splits file fixes the split)",
            ("splits.file=s.json", f"splits.{f}={v}"),
        )
        for f, v in (
            ("test_fraction", 0.3),
            ("val_fraction", 0.2),
            ("group_by_domain", "true"),
            ("use_predefined", "false"),
        )
    ),
    Rule(
        "splits.use_predefined",
        lambda r: r.data.type == "beir",
        "data.type is beir (only BEIR folders carry predefined splits)",
        ("splits.use_predefined=false",),
    ),
    Rule(
        "splits.group_by_domain",
        lambda r: r.data.type == "builtin" or bool(r.data.columns.domain),
        "the data has domains (builtin, or data.columns.domain set)",
        ("data.type=pairs", "data.name=null", "data.path=x.jsonl", "splits.group_by_domain=true"),
        "or set data.columns.domain",
    ),
    # negatives: each strategy reads its own fields
    Rule(
        "negatives.per_query",
        lambda r: r.negatives.strategy != "none",
        "negatives.strategy is not none",
        ("negatives.strategy=none", "negatives.per_query=3"),
    ),
    *(
        Rule(
            f"negatives.{f}",
            negatives_in("mined", "bm25"),
            "negatives.strategy is mined or bm25",
            ("negatives.strategy=random", f"negatives.{f}={v}"),
        )
        for f, v in (("range_min", 2), ("range_max", 30), ("sampling", "random"))
    ),
    *(
        Rule(
            f"negatives.{f}",
            negatives_in("mined"),
            "negatives.strategy is mined (dense scores)",
            ("negatives.strategy=bm25", f"negatives.{f}={v}"),
        )
        for f, v in (("relative_margin", 0.1), ("max_score", 0.9))
    ),
)
"""Rules of the sections every kind has: data, splits, negatives."""


def pool_rules(draws_from_pool: bool) -> tuple[Rule, ...]:
    """``negatives.pool``/``negatives.file``: random negatives from a file, a kind that ``draws_from_pool``
    only (the others draw negatives from the corpus)."""
    when = "negatives.strategy is random in an adapter recipe (qlora and cross_adapter draw negatives from the corpus)"
    random = negatives_in("random")
    return (
        Rule(
            "negatives.pool",
            lambda r: draws_from_pool and random(r),
            when,
            ("negatives.strategy=mined", "negatives.pool=file", "negatives.file=n.txt"),
        ),
        Rule(
            "negatives.file",
            lambda r: draws_from_pool and random(r) and r.negatives.pool == "file",
            "negatives.strategy is random and negatives.pool is file, in an adapter recipe",
            ("negatives.strategy=random", "negatives.file=n.txt"),
            "or set negatives.pool=file",
        ),
    )


FROZEN_ENCODER_RULES: tuple[Rule, ...] = (
    Rule(
        "cache.dir",
        lambda r: r.cache.enabled,
        "cache.enabled is true",
        ("cache.enabled=false", "cache.dir=/tmp/elsewhere"),
    ),
    Rule(
        "loss.margin",
        lambda r: r.loss.type == "triplet",
        "loss.type is triplet",
        ("loss.type=mnrl", "loss.margin=0.5"),
    ),
    Rule(
        "loss.temperature",
        lambda r: r.loss.type == "mnrl",
        "loss.type is mnrl",
        ("loss.type=triplet", "loss.temperature=0.1"),
    ),
)
"""Kinds that train on cached embeddings of a frozen encoder: the cache and the embedding losses."""

MERGE_RULES: tuple[Rule, ...] = tuple(
    Rule(
        f"merge.{f}",
        lambda r: r.merge.scale == "auto",
        "merge.scale is auto",
        (f"merge.{f}={v}",) if f == "grid" else ("eval.also=[x.jsonl]", f"merge.{f}={v}"),
    )
    for f, v in (("grid", "[0,1]"), ("max_drop", 0.01))
)

PATIENCE_RULE = Rule(
    "train.patience",
    validates,
    VALIDATES,
    ("splits.val_fraction=0", "train.patience=3"),
    "or set splits.val_fraction above 0",
)

MODEL_ALWAYS = (
    "name",
    "provider",
    "query_prompt",
    "document_prompt",
    "query_prompt_name",
    "document_prompt_name",
    "batch_size",
)
"""A model section's fields that always act."""

ALWAYS: frozenset[str] = frozenset(
    {
        "kind",
        "name",
        "seed",
        "device",
        "output.dir",
        "data.type",
        "data.max_queries",
        "eval.also",
        "splits.file",
        "data.columns.query",
        "data.columns.positive",
        "data.columns.id",
        "data.columns.domain",
        "negatives.strategy",
        *(f"train.{f}" for f in ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio")),
    }
)
"""The fields of every kind that always act; each kind's ``rules.py`` adds its own."""


def _get(recipe: BaseModel, path: str):
    """``(value, default)`` of the field at ``path``; ``None`` when the recipe kind has no such field."""
    node, parts = recipe, path.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if not isinstance(node, BaseModel):
            return None
    field = type(node).model_fields.get(parts[-1])
    if field is None:
        return None
    default = field.default_factory() if field.default_factory is not None else field.default
    return getattr(node, parts[-1]), default


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def ineffective(recipe: BaseModel, rules: Iterable[Rule]) -> list[tuple[Rule, object, object]]:
    """``(rule, value, default)`` for every field holding a non-default value this recipe would not use.

    Args:
        recipe: A validated recipe.
        rules: Its kind's rules (:meth:`finetune.kinds.RecipeKind.field_rules`).
    """
    out = []
    for rule in rules:
        got = _get(recipe, rule.path)
        if got is None or got[0] == got[1] or rule.applies(recipe):
            continue
        out.append((rule, *got))
    return out


def default_override(rule: Rule, default) -> str | None:
    """The ``path=default`` override that puts a field back to its default (``None`` for a whole section)."""
    return None if isinstance(default, BaseModel) else f"{rule.path}={_yaml(default)}"


def check_fields(recipe: BaseModel, rules: Iterable[Rule], where: str = "recipe") -> None:
    """Refuse ``recipe`` if a field holds a non-default value that this recipe would not use.

    Raises:
        FinetuneError: ``recipes/adapter.yaml: negatives.range_min=3 has no effect unless
            negatives.strategy is mined or bm25; remove it``.
    """
    for rule, got, default in ineffective(recipe, rules)[:1]:
        value = got.model_dump(exclude_defaults=True) if isinstance(got, BaseModel) else got
        reset = default_override(rule, default)
        fix = f"; remove it{f' (on the command line: {reset}, its default)' if reset else ''}"
        fix += f", {rule.fix}" if rule.fix else ""
        raise FinetuneError(f"{rule.path}={value!r} has no effect unless {rule.when}{fix}", where=where)
