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

import torch

from finetune.errors import FinetuneError
from finetune.memory.lengths import ColumnLengths
from finetune.memory.plan import METHODS, EncoderShape, Estimate, GiB, Setup, encoding_bytes, estimate, largest_fit
from finetune.qlora.config import mini_batch_of, resolved_optimizer, resolved_precision

AUTO_HEADROOM = 0.9  # mini_batch_size auto plans for 90% of the free memory: allocator fragmentation
# gradient_checkpointing auto on a CPU keeps the run under a quarter of the machine's RAM: unlike a GPU's memory,
# RAM is shared with the system and the user's other work, and swapping costs far more than checkpointing does
# (a quarter more time a step, 7.2 -> 2.2 GiB on Disfl-QA: results/qlora_rss_time_disfl.json)
CPU_RAM_SHARE = 0.25


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

    from finetune.models import resolve_model, saved_max_length

    path = resolve_model(model_config.name, config_only=True).path
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_config.trust_remote_code)
    max_len = saved_max_length(path) or getattr(config, "max_position_embeddings", 512)
    return EncoderShape(config, embedding_dim(path, config), name=model_config.name), int(max_len)


def method_of(recipe) -> str:
    """``nf4``, ``lora16`` or ``full``: the planner's name for what the recipe trains."""
    if recipe.method == "full":
        return "full"
    return "nf4" if recipe.quantization == "nf4" else "lora16"


def negative_columns(recipe) -> int:
    """Negative columns in each training row: ``negatives.per_query``, or none for in-batch negatives only."""
    return recipe.negatives.per_query if recipe.negatives.strategy != "none" else 0


def setup_of(recipe, device: str, max_len: int, lengths: ColumnLengths | None = None) -> Setup:
    """The recipe's step as the planner sees it, on ``device`` (a GPU: bf16 and 8-bit AdamW unless set);
    with the data's ``lengths``, each column at its longest text, else every text at the full length."""
    gpu = device == "cuda"
    negatives = negative_columns(recipe)
    optimizer, precision = resolved_optimizer(recipe.train, gpu), resolved_precision(recipe.train, gpu)
    seq_length = recipe.model.max_seq_length or max_len  # the recipe's length replaces the saved one in the run
    return Setup(
        batch_size=recipe.train.batch_size,
        seq_length=seq_length,
        column_lengths=lengths.columns(negatives, seq_length) if lengths else (),
        columns=2 + negatives,
        checkpointing=recipe.train.gradient_checkpointing is True,  # auto: planned without, then decided
        cached=recipe.loss.cached,
        mini_batch_size=(mini_batch_of(recipe) or 1) if recipe.loss.cached else None,  # auto: resolved later
        optimizer=optimizer,
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision],
        double_quant=recipe.double_quant,
        lora_r=recipe.lora.r,
        lora_targets=recipe.lora.target_modules
        if recipe.lora.target_modules == "auto"
        else tuple(recipe.lora.target_modules),
        attention="fused" if gpu else "math",
    )


def _ram(which: str) -> int:
    """The machine's RAM in bytes, ``total`` or ``available``: psutil's count, else the kernel's pages."""
    try:
        import psutil
    except ImportError:  # not a dependency
        pages = "SC_PHYS_PAGES" if which == "total" else "SC_AVPHYS_PAGES"
        return int(os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE"))
    return int(getattr(psutil.virtual_memory(), which))


def machine_memory() -> int:
    """Bytes of RAM this machine has."""
    return _ram("total")


def free_memory(device: str) -> int:
    """Bytes free for the run: the GPU's free memory, or the machine's available RAM on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    return _ram("available")


@dataclass
class RecipePlan:
    """The planner's estimate for one recipe's run: the training step's peak (on the GPU, or in RAM on a
    CPU) and the process's peak RSS, :meth:`rss`'s parts."""

    shape: EncoderShape
    setup: Setup
    method: str
    estimate: Estimate
    device: str = "cuda"
    process_bytes: int = 0  # the process's RSS when the plan was made (interpreter, libraries, data)
    corpus_bytes: int = 0  # the corpus embeddings a run holds (float32)
    teacher_bytes: int = 0  # the teacher's encoding (weights + a batch), once before training; 0 without one
    auto_checkpointing: str = ""  # gradient_checkpointing auto: what it chose and why, as the run says it

    def teacher_phase(self) -> int:
        """The teacher's encoding beside the student's weights (0 without a teacher). It runs once, before
        training, and its model is freed after: the run's peak is the larger of this and the training step."""
        return self.estimate.weights + self.teacher_bytes if self.teacher_bytes else 0

    def peak(self) -> int:
        """Predicted peak of the training device (RAM on a CPU): the training step, or the teacher's encoding."""
        return max(self.estimate.total, self.teacher_phase())

    def rss(self) -> dict:
        """Predicted peak RSS by part: the process as it stands, one float32 copy of the checkpoint (the
        reference model, later the exported one), the corpus embeddings, and on a CPU the larger of the
        training step and the teacher's encoding (they never overlap)."""
        cpu = self.device != "cuda"
        parts = {
            "process": self.process_bytes,
            "checkpoint_fp32": 4 * self.shape.parameters if cpu else 0,
            "corpus_embeddings": self.corpus_bytes,
            "training_step": self.estimate.total if cpu else 0,
            "teacher_encoding": self.teacher_phase() if cpu else 0,
        }
        held = parts["process"] + parts["checkpoint_fp32"] + parts["corpus_embeddings"]
        return {**parts, "total": held + max(parts["training_step"], parts["teacher_encoding"])}

    def line(self) -> str:
        e, s = self.estimate, self.setup
        loss = f", cached loss mini-batch {s.mini_batch_size}" if s.cached else ""
        ckpt = ", checkpointing" if s.checkpointing else ""
        where = "GPU " if self.device == "cuda" else ""
        teacher = f", teacher encoding {self.teacher_phase() / GiB:.2f} before training" if self.teacher_bytes else ""
        tokens = f"{s.seq_length} tokens"
        if s.column_lengths:
            tokens = f"{'/'.join(map(str, s.column_lengths))} tokens (each column's longest text)"
        return (
            f"memory plan: {METHODS[self.method]}, batch {s.batch_size} x {s.columns} texts x {tokens}"
            f"{loss}{ckpt}: {where}peak {e.total / GiB:.2f} GiB predicted (weights {e.weights / GiB:.2f}, trained + "
            f"optimizer {e.trainable / GiB:.2f}, activations {e.activations / GiB:.2f}, "
            f"loss {e.loss_buffers / GiB:.2f}){teacher}; peak RSS {self.rss()['total'] / GiB:.2f} GiB"
        )

    def can_checkpoint(self) -> bool:
        """Whether transformers can checkpoint this architecture (MPNet cannot)."""
        return self.shape.profile(self.method, self.setup).can_checkpoint

    def record(self, measured_peak_mb: float | None, measured_rss_mb: float | None = None) -> dict:
        """For metrics.json: the prediction, its inputs, and the measured peaks (GPU, RSS) beside it."""
        predicted = self.peak() / 2**20
        rss = self.rss()["total"] / 2**20
        return {
            "predicted": self.estimate.as_dict(),
            "setup": {k: v for k, v in self.setup.__dict__.items() if k != "lora_targets"},
            "predicted_peak_mb": predicted,
            "measured_peak_mb": measured_peak_mb,
            "measured_over_predicted": measured_peak_mb / predicted if measured_peak_mb else None,
            "predicted_rss": self.rss(),
            "predicted_rss_mb": rss,
            "measured_rss_mb": measured_rss_mb,
            "rss_measured_over_predicted": measured_rss_mb / rss if measured_rss_mb else None,
            "note": "the plan pads every column to its longest text in the data (setup.column_lengths; "
            "empty: every text seq_length tokens)",
        }


def plan_recipe(
    recipe,
    device: str,
    data=None,
    lengths: ColumnLengths | None = None,
    process_bytes: int | None = None,
    teacher=None,
) -> RecipePlan:
    """The estimate for ``recipe`` on ``device``; ``mini_batch_size: auto`` resolved from the free memory.
    ``data``'s corpus embeddings count towards the peak RSS; ``lengths``, the data's longest texts,
    set each column's length (else every text is at the full length); ``process_bytes`` is the process's RSS
    before the run loaded anything (else now); ``teacher`` (:class:`~finetune.qlora.teacher.Teacher`), found
    by the run, adds its encoding (its lengths read from ``data``). The run's random stream is left as it was:
    building the meta model draws from it, and LoRA's initialisation comes after the plan."""
    with torch.random.fork_rng(devices=[]):
        return _plan_recipe(recipe, device, data, lengths, process_bytes, teacher)


def teacher_bytes(recipe, teacher, device: str, data=None) -> int:
    """The teacher's encoding of the training rows (0 without one): its float32 weights and one batch of
    ``teacher.model.batch_size`` texts (pairs, for a cross-encoder) at the longest of ``data`` by its tokenizer
    (:func:`~finetune.qlora.teacher.longest_batch`; its full length without data). The plan counts it even when
    the teacher's cache will answer."""
    if teacher is None:
        return 0
    from finetune.qlora.teacher import longest_batch

    config = recipe.teacher.model
    shape, max_len = shape_of(config.model_copy(update={"name": str(teacher.path)}))
    length = longest_batch(teacher, config.max_seq_length or max_len, data)
    return encoding_bytes(shape, config.batch_size, length, "fused" if device == "cuda" else "math")


def _plan_recipe(recipe, device: str, data, lengths, process_bytes, teacher) -> RecipePlan:
    from finetune.timing import rss_bytes

    shape, max_len = shape_of(recipe.model)
    setup, method = setup_of(recipe, device, max_len, lengths), method_of(recipe)
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
    process = rss_bytes() if process_bytes is None else process_bytes
    plan = RecipePlan(
        shape,
        setup,
        method,
        estimate(shape, method, setup),
        device,
        process,
        4 * (len(data.corpus) if data is not None else 0) * shape.dim,
        teacher_bytes(recipe, teacher, device, data),
    )
    if recipe.train.gradient_checkpointing == "auto":
        plan = _checkpointing_if_needed(plan, device)
    return plan


def checkpointing_budget(device: str) -> tuple[int, str]:
    """Bytes ``gradient_checkpointing: auto`` lets a run add without checkpointing, and why: 90% of the GPU's
    free memory; on a CPU, :data:`CPU_RAM_SHARE` of the machine's RAM, or 90% of the free RAM when less."""
    available = free_memory(device)
    free = int(available * AUTO_HEADROOM)
    if device == "cuda":
        return free, f"90% of the {available / GiB:.1f} GiB of free GPU memory"
    ram = machine_memory()
    share = int(ram * CPU_RAM_SHARE)
    if free < share:
        return free, f"90% of the {available / GiB:.1f} GiB of free RAM"
    return share, f"a quarter of this machine's {ram / GiB:.1f} GiB of RAM"


def _run_needs(plan: RecipePlan, device: str) -> int:
    """What training adds: the step (a GPU), or everything beyond the process as it stands (a CPU: the step
    lives in RAM). Not the teacher's encoding: it ends before training, and checkpointing cannot shrink it."""
    if device == "cuda":
        return plan.estimate.total
    rss = plan.rss()
    return rss["checkpoint_fp32"] + rss["corpus_embeddings"] + rss["training_step"]


def _checkpointing_if_needed(plan: RecipePlan, device: str) -> RecipePlan:
    """``gradient_checkpointing: auto``: the plan with checkpointing on when, without it, the run would
    pass :func:`checkpointing_budget`; the decision and its reason are made once, here."""
    if not plan.can_checkpoint():
        said = f"off: {plan.shape.name} cannot checkpoint (its architecture does not support it)"
        return replace(plan, auto_checkpointing=said)
    need, (budget, why) = _run_needs(plan, device), checkpointing_budget(device)
    if need <= budget:
        said = f"off: the run adds {need / GiB:.1f} GiB, within {budget / GiB:.1f} GiB ({why})"
        return replace(plan, auto_checkpointing=said)
    setup = replace(plan.setup, checkpointing=True)
    said = f"on: without it the run adds {need / GiB:.1f} GiB, over {budget / GiB:.1f} GiB ({why})"
    return replace(plan, setup=setup, estimate=estimate(plan.shape, plan.method, setup), auto_checkpointing=said)


def with_checkpointing(recipe, on: bool):
    """``recipe`` with ``train.gradient_checkpointing`` set to ``on`` (a copy; the recipe itself when it is)."""
    if recipe.train.gradient_checkpointing is on:
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": on})})


def plan_run(
    recipe,
    device: str,
    backend: str,
    echo=print,
    data=None,
    lengths: ColumnLengths | None = None,
    process_bytes=None,
    teacher=None,
) -> tuple[RecipePlan | None, int | None, bool]:
    """For a run: the plan (printed), the cached loss's mini-batch (``auto`` resolved), and whether to
    checkpoint (``auto`` resolved); ``data``'s corpus counts towards the peak RSS, ``lengths``,
    ``process_bytes`` and ``teacher`` as :func:`plan_recipe` takes them. A model the meta-device count cannot
    run costs the run its plan line, not the run; ``auto`` mini-batches then cannot be resolved and say so,
    ``auto`` checkpointing stays off."""
    mini, auto = mini_batch_of(recipe), recipe.loss.cached and recipe.loss.mini_batch_size == "auto"
    checkpointing = recipe.train.gradient_checkpointing
    try:
        plan = plan_recipe(recipe, device, data, lengths, process_bytes, teacher)
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
        if checkpointing == "auto":
            echo("train.gradient_checkpointing auto -> off (no memory plan to decide on)")
        return None, mini, checkpointing is True
    echo(plan.line() + (" (the plan counts the peft path; unsloth's kernels differ)" if backend == "unsloth" else ""))
    if auto:
        mini = plan.setup.mini_batch_size
        echo(f"loss.mini_batch_size auto -> {mini} (the largest the plan fits in the free memory)")
    if checkpointing == "auto":
        echo(f"train.gradient_checkpointing auto -> {plan.auto_checkpointing}")
    return plan, mini, plan.setup.checkpointing
