"""Where each ``adapter`` recipe field has an effect (see :mod:`finetune.field_rules`)."""

from __future__ import annotations

from finetune.field_rules import (
    ALWAYS as SHARED_ALWAYS,
)
from finetune.field_rules import (
    FROZEN_ENCODER_RULES,
    MERGE_RULES,
    MODEL_ALWAYS,
    PATIENCE_RULE,
    SHARED_RULES,
    Rule,
    model_rules,
    pool_rules,
)

RULES: tuple[Rule, ...] = (
    *SHARED_RULES,
    *pool_rules(draws_from_pool=True),
    *FROZEN_ENCODER_RULES,
    *(
        Rule(
            f"adapter.{f}",
            lambda r: r.adapter.type == "mlp",
            "adapter.type is mlp",
            ("adapter.type=linear", f"adapter.{f}={v}"),
        )
        for f, v in (("hidden_dim", 64), ("dropout", 0.1))
    ),
    Rule(
        "loss.matryoshka_dims",
        lambda r: r.loss.type == "mnrl",
        "loss.type is mnrl (the nested loss truncates and renormalises the InfoNCE embeddings)",
        ("loss.type=triplet", "negatives.strategy=random", "loss.matryoshka_dims=[8]"),
    ),
    *MERGE_RULES,
    PATIENCE_RULE,
    *model_rules("model", frozen=True),
)

ALWAYS: frozenset[str] = SHARED_ALWAYS | {
    "merge.scale",
    "cache.enabled",
    "adapter.type",
    "loss.type",
    "train.grad_clip",
    "train.save_every",
    *(f"model.{f}" for f in MODEL_ALWAYS),
}
