"""Where each ``cross_adapter`` recipe field has an effect (see :mod:`finetune.field_rules`)."""

from __future__ import annotations

from finetune.field_rules import ALWAYS as SHARED_ALWAYS
from finetune.field_rules import (
    FROZEN_ENCODER_RULES,
    MODEL_ALWAYS,
    PATIENCE_RULE,
    SHARED_RULES,
    Rule,
    model_rules,
    pool_rules,
)


def _aligns(r) -> bool:
    return r.aligns()


RULES: tuple[Rule, ...] = (
    *SHARED_RULES,
    *pool_rules(draws_from_pool=False),
    *FROZEN_ENCODER_RULES,
    Rule(
        "projection.hidden_dim",
        lambda r: r.projection.type == "mlp",
        "projection.type is mlp",
        ("projection.type=linear", "projection.hidden_dim=64"),
    ),
    Rule(
        "loss.matryoshka_dims",
        lambda r: False,
        "the recipe trains a projection into a fixed document index (cross_adapter has no nested loss)",
        ("loss.matryoshka_dims=[8]",),
        "and train Matryoshka with kind: adapter or qlora",
    ),
    *(
        Rule(
            f"alignment.{f}",
            _aligns,
            "mode includes alignment_only or both",
            ("mode=label_only", f"alignment.{f}={v}"),
        )
        for f, v in (("objective", "identical_text"), ("use_queries", "false"), ("texts", "more.txt"))
    ),
    Rule(
        "projection.init",
        lambda r: "label_only" in r.modes(),
        "mode includes label_only",
        ("mode=both", "projection.init=runs/x/projection"),
    ),
    Rule(
        "alignment.ridge",
        lambda r: _aligns(r) and "scores" in r.alignment.objectives(),
        "alignment.objective includes scores (and mode includes alignment_only or both)",
        ("alignment.objective=identical_text", "alignment.ridge=[0.5]"),
    ),
    Rule(
        "alignment.mix",
        lambda r: _aligns(r) and r.projection.input == "both",
        "projection.input is both (and mode includes alignment_only or both)",
        ("projection.input=large", "alignment.mix=[0,1]"),
    ),
    *(
        Rule(
            f"alignment.{f}",
            lambda r: _aligns(r) and "identical_text" in r.alignment.objectives(),
            "alignment.objective includes identical_text (and mode includes alignment_only or both)",
            ("alignment.objective=scores", f"alignment.{f}={v}"),
        )
        for f, v in (("loss", "mse"), ("epochs", 3), ("batch_size", 16), ("lr", 0.01), ("weight_decay", 0.1))
    ),
    Rule(
        "domains.min_queries",
        lambda r: r.domains.leave_one_domain_out or r.domains.per_domain,
        "domains.leave_one_domain_out or domains.per_domain",
        ("domains.leave_one_domain_out=false", "domains.per_domain=false", "domains.min_queries=4"),
    ),
    Rule(
        "domains.test_fraction",
        lambda r: r.domains.per_domain,
        "domains.per_domain is true",
        ("domains.per_domain=false", "domains.test_fraction=0.5"),
    ),
    PATIENCE_RULE,
    Rule(
        "train.save_every",
        lambda r: False,
        "the run is checkpointed (a cross_adapter run is not: each cell trains in seconds)",
        ("train.save_every=2",),
    ),
    *model_rules("query_model", frozen=True),
    *model_rules("document_model", frozen=True),
)

ALWAYS: frozenset[str] = SHARED_ALWAYS | {
    "cache.enabled",
    "loss.type",
    "projection.type",
    "projection.input",
    "mode",
    "train_ratios",
    "domains.leave_one_domain_out",
    "domains.per_domain",
    "train.grad_clip",
    *(f"{section}.{f}" for section in ("query_model", "document_model") for f in MODEL_ALWAYS),
}
