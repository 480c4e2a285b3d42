"""``python -m finetune plan RECIPE [key=value ...] [--gpu-memory 16GiB]``: will it fit, before the run.

Prints, for nf4 LoRA, 16-bit LoRA and full fine-tuning at the recipe's batch size and sequence
length, the predicted peak GPU memory by part, with and without gradient checkpointing; with
``--gpu-memory``, the largest batch (or, with ``loss.cached``, the largest ``mini_batch_size`` at
the recipe's logical batch) that fits. No GPU is needed and no weights are loaded.
"""

from __future__ import annotations

import re
from dataclasses import replace

from finetune.errors import FinetuneError
from finetune.memory.plan import METHODS, GiB, estimate, largest_fit
from finetune.qlora.plan import method_of, setup_of, shape_of

_UNITS = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "": GiB}


def parse_memory(text: str) -> int:
    """``16GiB``, ``16G``, ``15.5 GB``, ``12000MiB`` -> bytes (a bare number is GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise FinetuneError(f"'{text}' is not a memory size; write e.g. 16GiB, 15GB or 12000MiB", where="--gpu-memory")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def plan_table(recipe, memory: int | None = None) -> str:
    """The printed plan of ``recipe`` on a GPU (bf16, 8-bit AdamW unless the recipe sets them)."""
    shape, max_len = shape_of(recipe.model)
    setup = setup_of(recipe, "cuda", max_len)
    ours = method_of(recipe)
    try:
        estimate(shape, ours, setup)  # builds the meta model and counts once; the table reuses the counts
    except Exception as exc:  # an architecture whose forward has no meta kernels, or a config transformers lacks
        raise FinetuneError(
            f"the planner could not run {recipe.model.name} on the meta device ({type(exc).__name__}: {exc})",
            where="plan",
        ) from None
    step = f"batch {setup.batch_size} x {setup.columns} texts x {setup.seq_length} tokens"
    if setup.cached:
        step += f", cached loss (mini-batch {setup.mini_batch_size})"
    lines = [
        f"memory plan: {recipe.model.name}: {shape.parameters / 1e6:,.1f}M parameters, {shape.layers} layers, "
        f"embedding dim {shape.dim}",
        f"step: {step}; {setup.optimizer}, {setup.dtype}; every text at full length (the worst case); GiB",
        "",
        f"{'method':<13}{'weights':>9}{'trained+opt':>13}{'activations':>13}{'(ckpt)':>9}{'loss':>7}"
        f"{'peak':>8}{'(ckpt)':>9}" + (f"  fits {memory / GiB:.1f} GiB (ckpt)" if memory else ""),
    ]
    for method, label in METHODS.items():
        plain, ckpt = (estimate(shape, method, replace(setup, checkpointing=c)) for c in (False, True))
        row = (
            f"{label:<13}{_gib(plain.weights):>9}{_gib(plain.trainable):>13}{_gib(plain.activations):>13}"
            f"{_gib(ckpt.activations):>9}{_gib(plain.loss_buffers):>7}{_gib(plain.total):>8}{_gib(ckpt.total):>9}"
        )
        if memory:
            fits = [largest_fit(shape, method, replace(setup, checkpointing=c), memory) for c in (False, True)]
            what = "mini-batch" if setup.cached else "batch"
            row += f"  {what} {fits[0] or '-'} ({fits[1] or '-'})"
        lines.append(row + ("   <- the recipe" if method == ours else ""))
    lines.append(
        "activations (ckpt): with train.gradient_checkpointing; "
        + (
            "the cached loss keeps one mini-batch's"
            if setup.cached
            else "loss.cached=true keeps one mini-batch's instead of the whole batch's"
        )
    )
    lines += _teacher_lines(recipe, estimate(shape, ours, setup).weights)
    if memory:
        _check_fits(recipe, shape, setup, memory)
    return "\n".join(lines)


def _teacher_lines(recipe, student_weights: int) -> list[str]:
    """A ``teacher``'s encoding, which runs once before training beside the student's weights (none without one)."""
    if recipe.teacher is None:
        return []
    from finetune.qlora.plan import teacher_bytes
    from finetune.qlora.teacher import check_teacher

    teacher = check_teacher(recipe.teacher)
    need = student_weights + teacher_bytes(recipe, teacher, "cuda")
    return [
        f"teacher {recipe.teacher.model.name} ({teacher.kind}): its encoding of the training rows, once before "
        f"training, peaks at {_gib(need)} GiB beside the student's weights (float32, a batch of "
        f"{recipe.teacher.model.batch_size} at full length; lower teacher.model.batch_size to shrink it)"
    ]


def _check_fits(recipe, shape, setup, memory: int) -> None:
    """Refuse a memory size that cannot hold the recipe's method at batch 2 (or mini-batch 1), saying what fits."""
    method = method_of(recipe)
    if largest_fit(shape, method, setup, memory) is not None:
        return
    smallest = estimate(shape, method, replace(setup, batch_size=2, mini_batch_size=1)).total
    tries = [
        (method, replace(setup, checkpointing=True), "train.gradient_checkpointing=true"),
        (
            method,
            replace(setup, checkpointing=True, cached=True, mini_batch_size=1),
            "loss.cached=true train.gradient_checkpointing=true",
        ),
        (
            "nf4",
            replace(setup, checkpointing=True, cached=True, mini_batch_size=1),
            "method=lora quantization=nf4 loss.cached=true train.gradient_checkpointing=true",
        ),
    ]
    instead = "nothing fits at this sequence length; lower model.max_seq_length"
    for other, alt, overrides in tries:
        fits = largest_fit(shape, other, alt, memory)
        if fits is not None:
            size = f"loss.mini_batch_size={fits}" if alt.cached else f"train.batch_size={fits}"
            instead = f"what fits: {overrides} {size}"
            break
    raise FinetuneError(
        f"{memory / GiB:.2f} GiB cannot hold {METHODS[method]} even at "
        f"{'mini-batch 1' if setup.cached else 'batch 2'} ({smallest / GiB:.2f} GiB needed); {instead}",
        where="--gpu-memory",
    )


def plan_text(recipe, gpu_memory: str | None = None) -> str:
    """``python -m finetune plan``'s output for ``recipe``: the table, with ``gpu_memory`` (``16GiB``) parsed."""
    return plan_table(recipe, parse_memory(gpu_memory) if gpu_memory else None)
