"""``python -m finetune plan recipes/reranker.yaml [--gpu-memory 16GiB]``: the reranker's training memory.

A reranker's step is ``train.batch_size`` sequences, each a (query, document) pair at the reranker's
length (``model.max_seq_length``, at most 512), through the same encoder inventory the qlora planner
counts (:mod:`finetune.memory.plan`): one column per example instead of anchor + positive + negatives.
The one-logit head (or the yes/no logits of the last token) adds nothing worth a row.
"""

from __future__ import annotations

from finetune.memory.plan import METHODS, GiB, Setup, estimate, largest_fit
from finetune.qlora.config import resolved_precision
from finetune.qlora.plan import method_of, shape_of
from finetune.qlora.plan_command import parse_memory
from finetune.reranker.model import PAIR_LENGTH


def setup_of(recipe, max_len: int) -> Setup:
    """The reranker's step on a GPU as the planner sees it: every pair at full length, AdamW in 32 bits."""
    precision = resolved_precision(recipe.train, cuda=True)
    return Setup(
        batch_size=recipe.train.batch_size,
        seq_length=recipe.model.max_seq_length or min(PAIR_LENGTH, max_len),  # as the reranker's model is cut
        columns=1,
        optimizer="adamw_torch",  # the reranker's trainer keeps transformers' default optimizer
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        double_quant=recipe.double_quant,
        lora_r=recipe.lora.r,
        lora_targets="auto" if recipe.lora.target_modules == "auto" else tuple(recipe.lora.target_modules),
    )


def plan_text(recipe, gpu_memory: str | None = None) -> str:
    """The printed plan: predicted peak GPU memory of each method at the recipe's batch and pair length, and with
    ``gpu_memory``, the largest batch of pairs that fits."""
    memory = parse_memory(gpu_memory) if gpu_memory else None
    shape, max_len = shape_of(recipe.model)
    setup = setup_of(recipe, max_len)
    ours = method_of(recipe)
    lines = [
        f"memory plan: reranker {recipe.model.name}: {shape.parameters / 1e6:,.1f}M parameters, {shape.layers} layers",
        f"step: batch {setup.batch_size} (query, document) pairs x {setup.seq_length} tokens; {setup.optimizer}, "
        f"{setup.dtype}; every pair at full length (the worst case); GiB",
        "",
        f"{'method':<13}{'weights':>9}{'trained+opt':>13}{'activations':>13}{'peak':>8}"
        + (f"  fits {memory / GiB:.1f} GiB" if memory else ""),
    ]
    for method, label in METHODS.items():
        e = estimate(shape, method, setup)
        row = (
            f"{label:<13}{e.weights / GiB:>9.2f}{e.trainable / GiB:>13.2f}{e.activations / GiB:>13.2f}"
            f"{e.total / GiB:>8.2f}"
        )
        if memory:
            row += f"  batch {largest_fit(shape, method, setup, memory) or '-'}"
        lines.append(row + ("   <- the recipe" if method == ours else ""))
    return "\n".join(lines)
