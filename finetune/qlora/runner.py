"""Run a ``qlora`` recipe: 4-bit/16-bit LoRA or full fine-tuning through SentenceTransformerTrainer."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from finetune import distributed
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.evaluation import build_evaluator, evaluate
from finetune.models import resolve_model
from finetune.qlora.backend import build_encoder, parameter_counts, select_backend
from finetune.qlora.config import QLoRARecipe
from finetune.qlora.trainer import NonFiniteLoss, latest_checkpoint, load_lora_checkpoint, make_trainer
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
        # the unquantised base model: scored as "base", and the one hard negatives are mined with
        self.reference = build_encoder(self.path, recipe, self.choice, quantize=False)
        self.negatives = self._negatives()
        print(f"{self.choice.describe()}; method {recipe.method}; trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%)")

    def _negatives(self):
        from finetune.mining import find_negatives

        config, model = self.recipe.negatives, self.recipe.model
        if config.strategy == "none":
            return None
        return find_negatives(
            self.data, self.splits.train, config, model=self.reference, seed=self.recipe.seed,
            batch_size=model.batch_size, query_prompt=model.query_prompt, document_prompt=model.document_prompt,
        )

    def _train_dataset(self):
        """(anchor, positive[, negative_1..k]) rows: one per relevant document of each train query."""
        from datasets import Dataset

        columns: dict[str, list[str]] = {"anchor": [], "positive": []}
        for q in self.splits.train:
            for d in sorted(self.data.relevant[q]):
                columns["anchor"].append(self.data.queries[q])
                columns["positive"].append(self.data.corpus[d])
                for i, neg in enumerate(self.negatives.by_query[q] if self.negatives else [], 1):
                    columns.setdefault(f"negative_{i}", []).append(self.data.corpus[neg])
        return Dataset.from_dict(columns)

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
            logging_nan_inf_filter=False,
            ddp_find_unused_parameters=False,
            ddp_backend="gloo" if distributed.world_size() > 1 and self.device == "cpu" else None,
            **({"gradient_checkpointing": True} if t.gradient_checkpointing and self.recipe.method == "full" else {}),
        )

    def fit(self, run_dir: Path, resume: bool = False) -> dict:
        """Score the base model, train, save the LoRA adapter and a merged model, score the merged model.

        With ``resume``, training continues from the newest complete checkpoint in
        ``run_dir/checkpoints`` (optimizer, scheduler, RNG and batch position included).
        Under several processes every rank trains (data-parallel, MNRL gathering the other
        ranks' embeddings as negatives) and only rank 0 writes the adapter and the model.
        """
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        test = build_evaluator(self.data, self.splits.test, "test", self.recipe.model.query_prompt, self.recipe.model.batch_size)
        base = evaluate(test, self.reference)
        del self.reference

        val = build_evaluator(self.data, self.splits.val, "val", self.recipe.model.query_prompt) if self.splits.val else None
        args = self._arguments(run_dir / "checkpoints", val is not None)
        trainer = make_trainer(
            self.recipe.method == "lora",
            model=self.model,
            args=args,
            train_dataset=self._train_dataset(),
            loss=MultipleNegativesRankingLoss(self.model, gather_across_devices=distributed.world_size() > 1),
            evaluator=val,
        )
        timer = StepTimer(cuda=self.device == "cuda")
        trainer.add_callback(timer)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = latest_checkpoint(run_dir / "checkpoints") if resume else None
        if resume:
            print(f"resuming from {start}" if start else "no checkpoint was saved before the run stopped: training from the start")
        resumed_from = int(start.name.split("-")[-1]) if start else None
        t0 = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=str(start) if start else None)
        except NonFiniteLoss as exc:
            last = latest_checkpoint(run_dir / "checkpoints")
            kept = f"the last good checkpoint is kept in {last}" if last else "no checkpoint was saved yet"
            raise FinetuneError(f"{exc}; training stopped and {kept}; lower train.lr or check the data", where="training") from None
        train_seconds = time.perf_counter() - t0
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank reads the best one
        self._restore_best(trainer)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        precision, optimizer = self._precision_and_optimizer()
        tuned_trained = evaluate(test, self.model)
        print(f"rank {distributed.rank()}/{distributed.world_size()}: steps {result.global_step}, "
              f"as-trained test ndcg@10 {tuned_trained['ndcg@10']:.6f}, lora sha256 {self._trainable_digest()}")
        if not distributed.is_main():
            return {"base": base, "tuned": tuned_trained}
        merged = self._save(run_dir)
        tuned = evaluate(test, merged)
        return {
            "base": base,
            "tuned": tuned,
            "tuned_as_trained": tuned_trained,
            "backend": self.choice.describe(),
            "method": self.recipe.method,
            "negatives": self.negatives.stats if self.negatives else {"strategy": "none"},
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "document_embeddings_recomputed": True,
            "train_steps": result.global_step,
            "resumed_from_step": resumed_from,
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
        load_lora_checkpoint(self.model, best)
        logger.info("restored the best checkpoint %s (%s %.4f)", best, trainer.args.metric_for_best_model, trainer.state.best_metric)

    def _trainable_digest(self) -> str:
        """A hash of the trained weights: equal on every rank when data-parallel training kept them in step."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

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
