"""Reranker training: (query, document, label) pairs from the train split and sentence-transformers'
``CrossEncoderTrainer`` with ``BinaryCrossEntropyLoss``.

Each train query gives one pair per relevant document (label 1) and one per negative (label 0); the
positive class is weighted by the negatives per query, as sentence-transformers' reranker training guide
does, so the few positives are not drowned out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers.cross_encoder import CrossEncoderTrainer

from finetune.qlora.progress import use_training_bar
from finetune.qlora.train import trainer_arguments


class RerankerTrainer(CrossEncoderTrainer):
    """sentence-transformers' ``CrossEncoderTrainer`` without its model-card callback (its documented override):
    the run's numbers, not the trainer's dataset statistics, describe the model."""

    def add_model_card_callback(self, default_args_dict) -> None:
        pass


@dataclass
class Training:
    """What :func:`train` leaves: steps taken, the mean training loss, the loss log and the seconds."""

    steps: int
    loss: float
    log: list
    seconds: float


def pairs_dataset(data, train_ids: list[str], negatives):
    """``query``/``document``/``label`` rows: each train query's relevant documents (1.0) and its negatives (0.0)."""
    from datasets import Dataset

    columns: dict[str, list] = {"query": [], "document": [], "label": []}
    for q in train_ids:
        labelled = [(d, 1.0) for d in sorted(data.relevant[q])] + [(d, 0.0) for d in negatives.by_query[q]]
        for d, label in labelled:
            columns["query"].append(data.queries[q])
            columns["document"].append(data.corpus[d])
            columns["label"].append(label)
    return Dataset.from_dict(columns)


def arguments(recipe, device: str, output_dir: Path, rows: int):
    """``CrossEncoderTrainingArguments`` of the recipe (no checkpoints: k, not the epoch, is chosen on validation)."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    return CrossEncoderTrainingArguments(
        output_dir=str(output_dir),
        **trainer_arguments(recipe, device, rows),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
    )


def train(model, recipe, dataset, device: str, output_dir: Path) -> Training:
    """Fine-tune ``model`` on ``dataset`` in place."""
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(recipe.negatives.per_query)))
    trainer = RerankerTrainer(
        model=model,
        args=arguments(recipe, device, output_dir, len(dataset)),
        train_dataset=dataset,
        loss=loss,
    )
    use_training_bar(trainer)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    log = [e for e in trainer.state.log_history if "loss" in e]
    return Training(result.global_step, float(result.training_loss), log, seconds)
