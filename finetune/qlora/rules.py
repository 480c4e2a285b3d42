"""Where each ``qlora`` recipe field has an effect (see :mod:`finetune.field_rules`)."""

from __future__ import annotations

from finetune.field_rules import ALWAYS as SHARED_ALWAYS
from finetune.field_rules import (
    MERGE_RULES,
    MODEL_ALWAYS,
    SHARED_RULES,
    VALIDATES,
    Rule,
    model_rules,
    pool_rules,
    validates,
)

LORA_WITNESSES = (
    ("r", 8),
    ("alpha", 8),
    ("dropout", 0.1),
    ("target_modules", "[query]"),
    ("use_rslora", "true"),
    ("bias", "all"),
)
"""A value other than the default for each LoRA field (``lora.*`` acts only for method lora)."""


def _lora(r) -> bool:
    return r.method == "lora"


RULES: tuple[Rule, ...] = (
    *SHARED_RULES,
    *pool_rules(draws_from_pool=False),
    Rule(
        "loss.mini_batch_size",
        lambda r: r.loss.cached,
        "loss.cached is true (the plain loss takes the whole batch at once)",
        ("loss.mini_batch_size=8",),
        "or set loss.cached=true",
    ),
    *MERGE_RULES,
    Rule(
        "train.val_documents",
        validates,
        VALIDATES,
        ("splits.val_fraction=0", "train.val_documents=100"),
        "or set splits.val_fraction above 0",
    ),
    Rule(
        "train.load_best_model_at_end",
        validates,
        VALIDATES,
        ("splits.val_fraction=0", "train.load_best_model_at_end=false"),
        "or set splits.val_fraction above 0",
    ),
    # LoRA settings are for method lora, quantisation settings for nf4
    Rule(
        "backend",
        _lora,
        "method is lora (full fine-tuning has one backend)",
        ("method=full", "quantization=none", "backend=peft"),
    ),
    Rule(
        "compute_dtype",
        _lora,
        "method is lora (full fine-tuning uses train.precision)",
        ("method=full", "quantization=none", "compute_dtype=float32"),
    ),
    Rule(
        "double_quant",
        lambda r: r.quantization == "nf4",
        "quantization is nf4",
        ("quantization=none", "double_quant=false"),
    ),
    *(
        Rule(f"lora.{f}", _lora, "method is lora", ("method=full", "quantization=none", f"lora.{f}={v}"))
        for f, v in (*LORA_WITNESSES, ("train_head", "true"))
    ),
    *model_rules("model", frozen=False),
    Rule(
        "export.onnx",
        lambda r: not r.model.trust_remote_code,
        "model.trust_remote_code is false (code from the checkpoint's repository is not traced to ONNX)",
        ("model.trust_remote_code=true", "export.onnx=true"),
    ),
    Rule(
        "teacher.temperature",
        lambda r: r.teacher is not None and r.teacher.loss != "margin_mse",
        "teacher.loss is kl_div or in_batch_kl (margin_mse matches score differences, with no softmax)",
        ("negatives.strategy=mined", "teacher.model=t", "teacher.loss=margin_mse", "teacher.temperature=0.1"),
    ),
    Rule(
        "model.encode_devices",
        lambda r: False,
        "the recipe encodes with a frozen model (adapter, cross_adapter); QLoRA trains the encoder",
        ("model.encode_devices=[cpu]",),
    ),
)

ALWAYS: frozenset[str] = SHARED_ALWAYS | {
    "merge.scale",
    "loss.cached",
    "loss.matryoshka_dims",
    "method",
    "quantization",
    "pooling",
    "teacher",
    *(
        f"train.{f}"
        for f in (
            "max_steps",
            "scheduler",
            "optimizer",
            "precision",
            "gradient_checkpointing",
            "eval_steps",
            "save_total_limit",
            "logging_steps",
            "max_grad_norm",
        )
    ),
    *(f"model.{f}" for f in MODEL_ALWAYS),
    "model.max_seq_length",
    "model.trust_remote_code",  # the qlora kind takes local models only
}
