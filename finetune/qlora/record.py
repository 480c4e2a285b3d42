"""What a qlora run records in ``metrics.json`` beside the shared outcome: how it trained, on what, and its checks."""

from __future__ import annotations

import torch

from finetune.models import describe_stack
from finetune.qlora import train as training
from finetune.qlora.losses import describe_loss
from finetune.timing import peak_rss_mb


def qlora_record(run, merged, tuned_trained: dict, checked: dict | None) -> dict:
    """The qlora fields of ``metrics.json`` for a finished :class:`~finetune.qlora.runner.QLoRARun` ``run``:
    how it trained, on what, and the export's checks (``merged``: the model ``model/`` holds)."""
    r, trainer, result = run.recipe, run.training.trainer, run.training.result
    precision, optimizer = training.precision_and_optimizer(r, run.device)
    return {
        "tuned_as_trained": tuned_trained,
        "backend": run.choice.describe(),
        "method": r.method,
        "model": {
            "stack": describe_stack(merged),
            "pooling": r.pooling if run.pooling_overridden else run.checkpoint_pooling,
            "checkpoint_pooling": run.checkpoint_pooling,
            "lora_targets": run.lora_targets,
            "head_trained": r.method == "full" or r.lora.train_head,
        },
        "prompts": {"query": run.prompts.query, "document": run.prompts.document},
        "fidelity": run.fidelity,
        "export": checked,
        "negatives": run.negatives.stats if run.negatives else {"strategy": "none"},
        "trainable_parameters": run.trainable,
        "total_parameters": run.total,
        "document_embeddings_recomputed": True,
        "val_documents": len(run.val_candidates) if run.val_candidates else len(run.data.corpus),
        "train_steps": result.global_step,
        "stopped_behind": run.training.behind.stopped if run.training.behind else None,
        "resumed_from_step": run.training.resumed_from,
        "train_loss": result.training_loss,
        "training_reused_from": str(run.adopted) if run.adopted else None,
        "log_history": trainer.state.log_history,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "peak_gpu_mb": run.gpu_peak,
        "memory_plan": run.memory.record(run.gpu_peak, peak_rss_mb()) if run.memory else None,
        "gradient_checkpointing": r.train.gradient_checkpointing,
        "loss": describe_loss(r.loss, run.mini_batch_size),
        "gpu": torch.cuda.get_device_name() if run.device == "cuda" else None,
        "precision": precision,
        "optimizer": optimizer,
        "batch_size": r.train.batch_size,
        # seconds.per_step includes evaluation and checkpointing; step_time counts optimizer steps only
        "step_time": run.training.timer.summary(),
    }


def card_facts(recipe, record: dict) -> dict:
    """What the model card says of a qlora run's model (see :attr:`finetune.outcome.Outcome.card`)."""
    if recipe.method == "full":
        how = "full fine-tuning of every weight"
    else:
        layers = sorted({path.rsplit(".", 1)[-1] for path in record["model"]["lora_targets"] or []})
        base = "4-bit NF4 base (QLoRA)" if recipe.quantization == "nf4" else "16-bit base"
        how = (
            f"LoRA on a {base}: r {recipe.lora.r}, alpha {recipe.lora.alpha} on "
            f"{', '.join(f'`{t}`' for t in layers) or 'auto'}; merged into the full-precision weights"
        )
    return {
        "base": recipe.model.name,
        "method": f"{how}; loss {record['loss']}, {record['train_steps']} steps",
        "changed": "Queries and documents both go through this model: re-index your documents with it.",
    }
