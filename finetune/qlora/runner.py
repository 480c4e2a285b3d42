"""Run a ``qlora`` recipe: 4-bit/16-bit LoRA or full fine-tuning through SentenceTransformerTrainer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from finetune.data.dataset import RetrievalData
from finetune.evaluation import build_evaluator, evaluate
from finetune.models import resolve_model
from finetune.qlora.backend import build_encoder, parameter_counts, select_backend
from finetune.qlora.config import QLoRARecipe
from finetune.splits import Splits
from finetune.timing import StepTimer

logger = logging.getLogger(__name__)


class QLoRARun:
    """Loads and checks everything (backend, model, datasets) before the run directory exists.

    Args:
        recipe: The validated recipe.
        data: Its data.
        splits: Its splits.
        device: Where to train.
        cache: Unused: the encoder changes, so embeddings cannot be cached.
    """

    def __init__(self, recipe: QLoRARecipe, data: RetrievalData, splits: Splits, device: str, cache=None):
        self.recipe, self.data, self.splits, self.device = recipe, data, splits, device
        self.choice = select_backend(recipe, device)
        self.path = resolve_model(recipe.model.name).path
        self.model = build_encoder(self.path, recipe, self.choice)
        self.trainable, self.total = parameter_counts(self.model)
        print(f"{self.choice.describe()}; method {recipe.method}; trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%)")

    def _train_dataset(self):
        from datasets import Dataset

        rows = [(self.data.queries[q], self.data.corpus[d]) for q in self.splits.train for d in sorted(self.data.relevant[q])]
        return Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})

    def _precision_and_optimizer(self) -> tuple[str, str]:
        t, cuda = self.recipe.train, self.device == "cuda"
        precision = t.precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        optimizer = t.optimizer if t.optimizer != "auto" else ("adamw_8bit" if cuda else "adamw_torch")
        return precision, optimizer

    def _arguments(self, output_dir: Path, has_val: bool):
        import importlib.util

        from sentence_transformers import SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import BatchSamplers

        t, cuda = self.recipe.train, self.device == "cuda"
        precision, optimizer = self._precision_and_optimizer()
        metric = f"eval_val_{self.model.similarity_fn_name}_ndcg@10"
        return SentenceTransformerTrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            learning_rate=t.lr,
            warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio in transformers v5
            lr_scheduler_type=t.scheduler,
            weight_decay=t.weight_decay,
            optim=optimizer,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
            max_grad_norm=t.max_grad_norm,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            eval_strategy="steps" if has_val else "no",
            eval_steps=t.eval_steps,
            save_strategy="steps",
            save_steps=t.eval_steps,
            save_total_limit=t.save_total_limit,
            # LoRA checkpoints hold only the adapter, which the trainer cannot load back into a
            # 4-bit model; _restore_best does that for LoRA, the trainer does it for full models.
            load_best_model_at_end=t.load_best_model_at_end and has_val and self.recipe.method == "full",
            metric_for_best_model=metric if has_val else None,
            greater_is_better=True,
            logging_steps=t.logging_steps,
            report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
            seed=self.recipe.seed,
            data_seed=self.recipe.seed,
            use_cpu=self.device == "cpu",
            **({"gradient_checkpointing": True} if t.gradient_checkpointing and self.recipe.method == "full" else {}),
        )

    def fit(self, run_dir: Path) -> dict:
        """Score the base model, train, save the LoRA adapter and a merged model, score the merged model."""
        from sentence_transformers import SentenceTransformerTrainer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        test = build_evaluator(self.data, self.splits.test, "test", self.recipe.model.query_prompt, self.recipe.model.batch_size)
        reference = build_encoder(self.path, self.recipe, self.choice, quantize=False)
        base = evaluate(test, reference)
        del reference

        val = build_evaluator(self.data, self.splits.val, "val", self.recipe.model.query_prompt) if self.splits.val else None
        args = self._arguments(run_dir / "checkpoints", val is not None)
        trainer = SentenceTransformerTrainer(
            model=self.model,
            args=args,
            train_dataset=self._train_dataset(),
            loss=MultipleNegativesRankingLoss(self.model),
            evaluator=val,
        )
        timer = StepTimer(cuda=self.device == "cuda")
        trainer.add_callback(timer)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
        self._restore_best(trainer)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        precision, optimizer = self._precision_and_optimizer()
        tuned_trained = evaluate(test, self.model)

        merged = self._save(run_dir)
        tuned = evaluate(test, merged)
        return {
            "base": base,
            "tuned": tuned,
            "tuned_as_trained": tuned_trained,
            "backend": self.choice.describe(),
            "method": self.recipe.method,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "document_embeddings_recomputed": True,
            "train_steps": result.global_step,
            "train_loss": result.training_loss,
            "log_history": trainer.state.log_history,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "peak_gpu_mb": gpu_peak,
            "gpu": torch.cuda.get_device_name() if self.device == "cuda" else None,
            "precision": precision,
            "optimizer": optimizer,
            "batch_size": self.recipe.train.batch_size,
            # per_step includes evaluation and checkpointing; step_time counts optimizer steps only
            "seconds": {"train": train_seconds, "per_step": train_seconds / max(1, result.global_step)},
            "step_time": timer.summary(),
        }

    def _restore_best(self, trainer) -> None:
        """Load the best checkpoint's LoRA weights (by validation NDCG@10) into the trained model."""
        best = trainer.state.best_model_checkpoint
        if self.recipe.method != "lora" or not self.recipe.train.load_best_model_at_end or not best:
            return
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from peft import PeftModel

        target = self.model[0].auto_model
        state = load_file(str(Path(best) / "adapter_model.safetensors"))
        if not isinstance(target, PeftModel):  # peft's add_adapter (our peft backend), not get_peft_model (unsloth)
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        result = set_peft_model_state_dict(target, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"best checkpoint {best} does not fit the model: missing {missing[:2]}, unexpected {result.unexpected_keys[:2]}")
        logger.info("restored the best checkpoint %s (%s %.4f)", best, trainer.args.metric_for_best_model, trainer.state.best_metric)

    def _save(self, run_dir: Path):
        """LoRA adapter folder (peft format) and a merged full-precision SentenceTransformer folder."""
        from finetune.adapter.export import save_model_folder

        if self.recipe.method == "full":
            save_model_folder(self.model, run_dir / "model")
            return self.model
        from peft import PeftModel

        self.model[0].auto_model.save_pretrained(str(run_dir / "lora"))
        merged = build_encoder(self.path, self.recipe, self.choice, quantize=False)
        peft_model = PeftModel.from_pretrained(merged[0].auto_model, str(run_dir / "lora"))
        merged[0].auto_model = peft_model.merge_and_unload()
        save_model_folder(merged, run_dir / "model")
        return merged
