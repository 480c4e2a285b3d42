"""The memory plan of a ``qlora`` recipe: its model's shape, its step, the free memory it has.

:func:`plan_recipe` reads the checkpoint's ``config.json`` (and its Dense heads' sizes) from the
resolved folder, never its weights, and builds :class:`~finetune.memory.plan.Setup` from the
recipe: batch size, texts per example (anchor, positive, negatives), sequence length,
checkpointing, the cached loss and the optimizer a GPU run uses. Every GPU run prints
:meth:`RecipePlan.line` first and writes :meth:`RecipePlan.record` beside the measured peak.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.memory.plan import METHODS, EncoderShape, Estimate, GiB, Setup, estimate, largest_fit
from finetune.qlora.config import mini_batch_of, resolved_optimizer, resolved_precision

AUTO_HEADROOM = 0.9  # mini_batch_size auto plans for 90% of the free memory: allocator fragmentation


def embedding_dim(path: Path, config) -> int:
    """The sentence embedding's size: the last Dense head's ``out_features``, else the hidden size."""
    dim = int(config.hidden_size)
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            dense = path / module.get("path", "") / "config.json"
            if "Dense" in module.get("type", "") and dense.is_file():
                dim = int(json.loads(dense.read_text()).get("out_features", dim))
    return dim


def shape_of(model_config) -> tuple[EncoderShape, int]:
    """The recipe model's :class:`EncoderShape` (from its config only) and its saved max sequence length."""
    from transformers import AutoConfig

    from finetune.models import resolve_model

    path = resolve_model(model_config.name, config_only=True).path
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_config.trust_remote_code)
    saved = path / "sentence_bert_config.json"
    max_len = json.loads(saved.read_text()).get("max_seq_length") if saved.is_file() else None
    max_len = max_len or getattr(config, "max_position_embeddings", 512)
    return EncoderShape(config, embedding_dim(path, config), name=model_config.name), int(max_len)


def method_of(recipe) -> str:
    """``nf4``, ``lora16`` or ``full``: the planner's name for what the recipe trains."""
    if recipe.method == "full":
        return "full"
    return "nf4" if recipe.quantization == "nf4" else "lora16"


def setup_of(recipe, device: str, max_len: int) -> Setup:
    """The recipe's step as the planner sees it, on ``device`` (a GPU: bf16 and 8-bit AdamW unless set)."""
    gpu = device == "cuda"
    negatives = recipe.negatives.per_query if recipe.negatives.strategy != "none" else 0
    optimizer, precision = resolved_optimizer(recipe.train, gpu), resolved_precision(recipe.train, gpu)
    return Setup(
        batch_size=recipe.train.batch_size,
        seq_length=min(recipe.model.max_seq_length or max_len, max_len),
        columns=2 + negatives,
        checkpointing=recipe.train.gradient_checkpointing,
        cached=recipe.loss.cached,
        mini_batch_size=(mini_batch_of(recipe) or 1) if recipe.loss.cached else None,  # auto: resolved later
        optimizer=optimizer,
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        double_quant=recipe.double_quant,
        lora_r=recipe.lora.r,
        lora_targets=recipe.lora.target_modules
        if recipe.lora.target_modules == "auto"
        else tuple(recipe.lora.target_modules),
    )


def free_memory(device: str) -> int:
    """Bytes free for the run: the GPU's free memory, or the machine's available RAM on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil
    except ImportError:  # not a dependency: the kernel's count of free pages
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


@dataclass
class RecipePlan:
    """The planner's estimate for one recipe's run."""

    shape: EncoderShape
    setup: Setup
    method: str
    estimate: Estimate

    def line(self) -> str:
        e, s = self.estimate, self.setup
        loss = f", cached loss mini-batch {s.mini_batch_size}" if s.cached else ""
        ckpt = ", checkpointing" if s.checkpointing else ""
        return (
            f"memory plan: {METHODS[self.method]}, batch {s.batch_size} x {s.columns} texts x {s.seq_length} tokens"
            f"{loss}{ckpt}: peak {e.total / GiB:.2f} GiB predicted (weights {e.weights / GiB:.2f}, trained + "
            f"optimizer {e.trainable / GiB:.2f}, activations {e.activations / GiB:.2f}, "
            f"loss {e.loss_buffers / GiB:.2f})"
        )

    def record(self, measured_peak_mb: float | None) -> dict:
        """For metrics.json: the prediction, its inputs, and the measured peak beside it."""
        predicted = self.estimate.total / 2**20
        return {
            "predicted": self.estimate.as_dict(),
            "setup": {k: v for k, v in self.setup.__dict__.items() if k != "lora_targets"},
            "predicted_peak_mb": predicted,
            "measured_peak_mb": measured_peak_mb,
            "measured_over_predicted": measured_peak_mb / predicted if measured_peak_mb else None,
            "note": "the plan assumes every text is seq_length tokens; real batches pad to their longest text",
        }


def plan_recipe(recipe, device: str) -> RecipePlan:
    """The estimate for ``recipe`` on ``device``; ``mini_batch_size: auto`` resolved from the free memory."""
    shape, max_len = shape_of(recipe.model)
    setup, method = setup_of(recipe, device, max_len), method_of(recipe)
    if recipe.loss.cached and recipe.loss.mini_batch_size == "auto":
        free = free_memory(device)
        fits = largest_fit(shape, method, setup, int(free * AUTO_HEADROOM))
        if fits is None:
            raise FinetuneError(
                f"auto: not even a mini-batch of 1 fits in {free / GiB:.1f} GiB free "
                f"({estimate(shape, method, setup).total / GiB:.1f} GiB needed at 1); free memory, lower "
                "model.max_seq_length, or use quantization=nf4",
                where="recipe: loss.mini_batch_size",
            )
        setup = replace(setup, mini_batch_size=fits)
    return RecipePlan(shape, setup, method, estimate(shape, method, setup))


def plan_run(recipe, device: str, backend: str, echo=print) -> tuple[RecipePlan | None, int | None]:
    """For a run: the plan (printed first on a GPU, and when ``mini_batch_size`` is ``auto``) and the
    cached loss's mini-batch, ``auto`` resolved. A model the meta-device count cannot run costs the
    GPU run its plan line, not the run; ``auto`` then cannot be resolved and says so."""
    mini, auto = mini_batch_of(recipe), recipe.loss.cached and recipe.loss.mini_batch_size == "auto"
    if device != "cuda" and not auto:
        return None, mini
    try:
        plan = plan_recipe(recipe, device)
    except FinetuneError:
        raise
    except Exception as exc:  # any failure of the count on an unusual architecture
        if auto:
            raise FinetuneError(
                f"auto needs the memory planner, which failed on this model ({type(exc).__name__}: {exc}); "
                "set a number",
                where="recipe: loss.mini_batch_size",
            ) from None
        echo(f"memory plan: not available for this model ({type(exc).__name__})")
        return None, mini
    echo(plan.line() + (" (the plan counts the peft path; unsloth's kernels differ)" if backend == "unsloth" else ""))
    if auto:
        mini = plan.setup.mini_batch_size
        echo(f"loss.mini_batch_size auto -> {mini} (the largest the plan fits in the free memory)")
    return plan, mini
