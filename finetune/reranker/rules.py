"""Where each ``reranker`` recipe field has an effect (see :mod:`finetune.field_rules`)."""

from __future__ import annotations

from finetune.field_rules import ALWAYS as SHARED_ALWAYS
from finetune.field_rules import MODEL_ALWAYS, SHARED_RULES, Rule, model_rules, pool_rules
from finetune.qlora.rules import LORA_WITNESSES


def _lora(r) -> bool:
    return r.method == "lora"


def _never(path: str, when: str, value, fix: str = "") -> Rule:
    return Rule(path, lambda r: False, when, (f"{path}={value}",), fix)


RULES: tuple[Rule, ...] = (
    *(r for r in SHARED_RULES if r.path != "negatives.per_query"),  # strategy none is refused: it always acts
    *pool_rules(draws_from_pool=False),
    *model_rules("model", frozen=False),
    *model_rules("retriever", frozen=False),
    *(
        _never(f"model.{f}", "the reranker reads each (query, document) pair as given (no prompts)", v)
        for f, v in (
            ("query_prompt", "q"),
            ("document_prompt", "d"),
            ("query_prompt_name", "query"),
            ("document_prompt_name", "document"),
        )
    ),
    _never("model.encode_devices", "the recipe encodes with a frozen model (adapter, cross_adapter)", "[cpu]"),
    _never(
        "retriever.encode_devices",
        "the recipe encodes with a frozen model (adapter, cross_adapter); the retriever encodes in this process",
        "[cpu]",
    ),
    _never(
        "eval.also",
        "the recipe scores a single-stage encoder (adapter, qlora, cross_adapter); a reranker is scored on its own "
        "data's test split",
        "[x.jsonl]",
    ),
    Rule(
        "rerank.grid",
        lambda r: r.rerank.k == "auto",
        "rerank.k is auto",
        ("rerank.k=10", "rerank.grid=[0,10]"),
        "or set rerank.k=auto",
    ),
    Rule("compute_dtype", _lora, "method is lora (full fine-tuning uses train.precision)", ("compute_dtype=float32",)),
    Rule(
        "double_quant",
        lambda r: r.quantization == "nf4",
        "quantization is nf4",
        ("double_quant=false",),
    ),
    *(Rule(f"lora.{f}", _lora, "method is lora", (f"lora.{f}={v}",), "or set method=lora") for f, v in LORA_WITNESSES),
)

ALWAYS: frozenset[str] = (SHARED_ALWAYS - {"eval.also"}) | {
    "method",
    "quantization",
    "rerank.k",
    "negatives.per_query",
    *(f"train.{f}" for f in ("max_steps", "scheduler", "precision", "logging_steps", "max_grad_norm")),
    *(f"model.{f}" for f in ("name", "provider", "batch_size", "max_seq_length", "trust_remote_code")),
    *(f"retriever.{f}" for f in (*MODEL_ALWAYS, "max_seq_length", "trust_remote_code")),
}
