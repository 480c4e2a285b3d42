"""QLoRA training: the dataset, the trainer's arguments, and one training from an explicit start.

:func:`train` is the whole of it: fresh, resumed from a killed run's newest checkpoint, or adopted
from a sweep point that trained exactly this (same recipe, splits and seed). The trainer is
sentence-transformers' own (:class:`~finetune.qlora.trainer.FinetuneTrainer`), with MNRL, the
no-duplicates sampler and validation NDCG@10 every ``train.eval_steps``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import distributed
from finetune.contract import Start
from finetune.errors import FinetuneError
from finetune.qlora.behind import StopBehind
from finetune.qlora.config import resolved_optimizer, resolved_precision
from finetune.qlora.progress import use_training_bar
from finetune.qlora.trainer import FinetuneTrainer, NonFiniteLoss, latest_checkpoint, load_lora_checkpoint
from finetune.timing import StepTimer

logger = logging.getLogger(__name__)


@dataclass
class Training:
    """What :func:`train` leaves: the trainer (its state and log), its output, and how it went."""

    trainer: object
    result: object  # transformers' TrainOutput: global_step, training_loss
    resumed_from: int | None
    timer: StepTimer
    behind: StopBehind | None
    seconds: float


def train_dataset(data, train_ids: list[str], negatives, teacher=None):
    """(anchor, positive[, negative_1..k][, label]) rows: one per relevant document of each train query; ``label``
    holds the teacher's scores of the row's documents (:class:`~finetune.qlora.teacher.Distillation`)."""
    from datasets import Dataset

    columns: dict[str, list] = {"anchor": [], "positive": []}
    for q in train_ids:
        for d in sorted(data.relevant[q]):
            columns["anchor"].append(data.queries[q])
            columns["positive"].append(data.corpus[d])
            for i, neg in enumerate(negatives.by_query[q] if negatives else [], 1):
                columns.setdefault(f"negative_{i}", []).append(data.corpus[neg])
    if teacher is not None:  # rows in the same order as teacher.training_rows
        columns["label"] = teacher.labels.tolist()
    return Dataset.from_dict(columns)


def precision_and_optimizer(recipe, device: str) -> tuple[str, str]:
    """The resolved ``train.precision`` and ``train.optimizer`` on ``device``."""
    t, cuda = recipe.train, device == "cuda"
    return resolved_precision(t, cuda, cuda and torch.cuda.is_bf16_supported()), resolved_optimizer(t, cuda)


def steps_per_epoch(train, rows: int) -> int:
    """Optimizer steps in one pass over ``rows`` training rows (batches across every process)."""
    return math.ceil(rows / (train.batch_size * distributed.world_size()))


def max_steps(train, rows: int) -> int:
    """``train.max_steps`` caps the epochs: training stops at whichever comes first, so both settings act."""
    if train.max_steps <= 0:
        return -1
    return min(train.max_steps, math.ceil(train.epochs * steps_per_epoch(train, rows)))


def eval_steps(train, rows: int) -> int:
    """Steps between validations (and checkpoints): ``train.eval_steps``, or for ``auto`` one epoch,
    shortened to the whole run when ``train.max_steps`` ends it within the first epoch.

    Example:
        >>> from finetune.qlora.config import QLoRATrainConfig
        >>> eval_steps(QLoRATrainConfig(batch_size=32), rows=352), eval_steps(QLoRATrainConfig(max_steps=4), 352)
        (11, 4)
    """
    if train.eval_steps != "auto":
        return train.eval_steps
    total = max_steps(train, rows)
    per_epoch = steps_per_epoch(train, rows)
    return per_epoch if total < 0 else max(1, min(per_epoch, total))


def trainer_arguments(recipe, device: str, rows: int) -> dict:
    """The ``TrainingArguments`` that ``train`` (a :class:`~finetune.qlora.config.TrainerArguments`) and the seed
    set, for any sentence-transformers trainer (qlora's, the reranker's)."""
    t, cuda = recipe.train, device == "cuda"
    precision = resolved_precision(t, cuda, cuda and torch.cuda.is_bf16_supported())
    return dict(
        num_train_epochs=t.epochs,
        max_steps=max_steps(t, rows),
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio in transformers v5
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        seed=recipe.seed,
        data_seed=recipe.seed,
        use_cpu=device == "cpu",
        logging_nan_inf_filter=False,
    )


def arguments(recipe, device: str, output_dir: Path, metric: str | None, prompts: dict | None, rows: int):
    """``SentenceTransformerTrainingArguments`` of the recipe; ``metric`` None: no validation split."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    t, cuda, has_val = recipe.train, device == "cuda", metric is not None
    every = eval_steps(t, rows)
    _, optimizer = precision_and_optimizer(recipe, device)
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        **trainer_arguments(recipe, device, rows),
        per_device_eval_batch_size=t.batch_size,
        optim=optimizer,
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=prompts,  # the query prompt on anchors, the document prompt on positives and negatives
        eval_strategy="steps" if has_val else "no",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=t.save_total_limit,
        # LoRA checkpoints hold only the adapter, which the trainer cannot load back into a 4-bit
        # model; the runner restores the best one for LoRA, the trainer does it for full models.
        load_best_model_at_end=t.load_best_model_at_end and has_val and recipe.method == "full",
        metric_for_best_model=metric,
        greater_is_better=True,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if distributed.world_size() > 1 and device == "cpu" else None,
    )


def train(
    trainer: FinetuneTrainer, run_dir: Path, start: Start, device: str, stop_behind=None, echo=print
) -> Training:
    """Train from ``start``: fresh, from ``run_dir``'s newest checkpoint, or adopting ``start.point``'s.

    Args:
        trainer: The built trainer (its evaluator, when set, scores validation every ``eval_steps``).
        run_dir: The run directory (``checkpoints/`` inside it).
        start: How training starts (:class:`~finetune.contract.Start`).
        device: ``cuda`` times steps with CUDA events and resets the peak-memory count.
        stop_behind: A sweep point: the leader's validation curve to stop behind (needs validation).
        echo: Where the start line goes.
    """
    timer = StepTimer(cuda=device == "cuda")
    trainer.add_callback(timer)
    use_training_bar(trainer)
    behind = StopBehind(stop_behind, trainer.args.metric_for_best_model) if stop_behind else None
    if behind and trainer.args.metric_for_best_model:  # set only when there is a validation split
        trainer.add_callback(behind)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if start.mode == "adopt":  # a sweep's final run: the chosen point trained this
        loss = json.loads((start.point / "metrics.json").read_text())["train_loss"]
        result = trainer.adopt(start.point / "checkpoints", loss)
        echo(f"training: the same as {start.point} (recipe, splits, seed): its checkpoints are reused")
        return Training(trainer, result, result.global_step, timer, behind, time.perf_counter() - t0)
    resume = latest_checkpoint(run_dir / "checkpoints") if start.mode == "resume" else None
    if start.mode == "resume":
        echo(
            f"resuming from {resume}"
            if resume
            else "no checkpoint was saved before the run stopped: training from the start"
        )
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteLoss as exc:
        last = latest_checkpoint(run_dir / "checkpoints")
        kept = f"the last good checkpoint is kept in {last}" if last else "no checkpoint was saved yet"
        raise FinetuneError(
            f"{exc}; training stopped and {kept}; lower train.lr or check the data", where="training"
        ) from None
    resumed_from = int(resume.name.split("-")[-1]) if resume else None
    return Training(trainer, result, resumed_from, timer, behind, time.perf_counter() - t0)


def restore_best(trainer, recipe, model) -> None:
    """Load the best checkpoint's LoRA weights (by validation NDCG@10) into the trained model (the
    trainer does this itself for full fine-tuning)."""
    best = trainer.state.best_model_checkpoint
    if recipe.method != "lora" or not recipe.train.load_best_model_at_end or not best:
        return
    load_lora_checkpoint(model, best)
    logger.info(
        "restored the best checkpoint %s (%s %.4f)",
        best,
        trainer.args.metric_for_best_model,
        trainer.state.best_metric,
    )


def trainable_digest(model) -> str:
    """A hash of the trained weights: equal on every rank when data-parallel training kept them in step."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
