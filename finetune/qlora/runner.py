"""Run a ``qlora`` recipe: 4-bit/16-bit LoRA or full fine-tuning through SentenceTransformerTrainer."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from finetune import distributed
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.evaluation import build_evaluator, evaluate
from finetune.extra_sets import ExtraSet, load_extra_sets, score_extra_sets
from finetune.matryoshka import check_against_dimension, dims_line, model_ndcg_by_dimension
from finetune.memory.recipe_plan import plan_run
from finetune.merge_scale import (
    check_can_choose_scale,
    choose_scale,
    interpolate,
    lora_scale,
    merge_line,
    plot_tradeoff,
    scale_lora_in_place,
)
from finetune.models import describe_stack, load_sentence_transformer
from finetune.qlora.backend import build_encoder, parameter_counts, select_backend
from finetune.qlora.behind import StopBehind
from finetune.qlora.config import QLoRARecipe, resolved_optimizer, resolved_precision
from finetune.qlora.losses import build_loss, describe_loss
from finetune.qlora.stack import check_fidelity, check_pooling_inputs, cosine_to, embed, pooling_mode
from finetune.qlora.targets import summarise
from finetune.qlora.trainer import FinetuneTrainer, NonFiniteLoss, latest_checkpoint, load_lora_checkpoint
from finetune.splits import Splits
from finetune.timing import StepTimer, seconds_per_step

logger = logging.getLogger(__name__)


class QLoRARun:
    """Loads and checks everything (backend, model, datasets) before the run directory exists.

    The model is the checkpoint as ``SentenceTransformer(path)`` loads it: its pooling, Dense
    layers, Normalize and prompts. That plain model is the ``base`` row and mines hard negatives;
    the training stack is checked against it before training (:func:`~finetune.qlora.stack.check_fidelity`).

    Args:
        recipe: The validated recipe.
        data: Its data.
        splits: Its splits.
        device: Where to train.
        cache: Unused: the encoder changes, so embeddings cannot be cached.
        echo: Where progress lines go (rank 0's print).
    """

    resumable = True
    export = True
    stop_behind = None  # a sweep point: the leader's validation curve (finetune.qlora.behind.Leader)
    trained_in = None  # a sweep's final run: the chosen point's run directory, whose training this one repeats

    def __init__(self, recipe: QLoRARecipe, data: RetrievalData, splits: Splits, device: str, cache=None, echo=print):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        self.choice = select_backend(recipe, device)
        self.memory, self.mini_batch_size = plan_run(recipe, device, self.choice.backend, echo)
        self.reference, resolved, self.prompts = load_sentence_transformer(recipe.model, device)
        check_against_dimension(
            recipe.loss.matryoshka_dims, self.reference.get_embedding_dimension(), recipe.model.name
        )
        self.checkpoint_pooling = pooling_mode(self.reference)
        self.pooling_overridden = recipe.pooling != "auto" and recipe.pooling != self.checkpoint_pooling
        self.fidelity = self._check_stack()
        self.trainable, self.total = parameter_counts(self.model)
        self.negatives = self._negatives()
        self.extra = load_extra_sets(recipe.eval.also, recipe.splits, recipe.seed)
        check_can_choose_scale(recipe, splits, self.extra)
        self._say_what_runs(resolved)

    def _sample(self) -> tuple[list[str], list[str]]:
        """A few of the run's own train queries and their documents, for the fidelity checks."""
        ids = self.splits.train[:8]
        docs = list(dict.fromkeys(d for q in ids for d in sorted(self.data.relevant[q])))[:8]
        return [self.data.queries[q] for q in ids], [self.data.corpus[d] for d in docs]

    def _check_stack(self) -> dict:
        """Build the training model; before that, prove the recipe's stack is the checkpoint's."""
        queries, documents = self._sample()
        check_pooling_inputs(self.reference, queries)
        exact = (
            self.recipe.quantization == "none"
            and self.choice.compute_dtype == torch.float32
            and self.choice.backend != "unsloth"
        )
        if not exact:  # the 4-bit/16-bit model differs by rounding: check the full-precision build instead
            built, _ = build_encoder(self.recipe, self.choice, quantize=False)
            fidelity = check_fidelity(built, self.reference, queries, documents, self.pooling_overridden)
            del built
        self.model, self.lora_targets = build_encoder(self.recipe, self.choice, reference=self.reference)
        if exact:  # at step 0 LoRA adds nothing, so the training model itself must match
            fidelity = check_fidelity(self.model, self.reference, queries, documents, self.pooling_overridden)
        ours, theirs = (
            [type(m).__name__ for m in self.model.children()],
            [type(m).__name__ for m in self.reference.children()],
        )
        if ours != theirs:
            raise FinetuneError(
                f"the training model's modules {' -> '.join(ours)} are not the checkpoint's {' -> '.join(theirs)}",
                where="fidelity check",
            )
        if not self.pooling_overridden:  # how far 4-bit (or 16-bit) rounding moves the embeddings, for the record
            cos = cosine_to(self.reference, self.model, queries, documents)
            fidelity.update(training_model_min_cosine=float(cos.min()), training_model_mean_cosine=float(cos.mean()))
        return fidelity

    def _say_what_runs(self, resolved) -> None:
        r = self.recipe
        pooling = self.checkpoint_pooling
        if self.pooling_overridden:
            pooling = f"{r.pooling} (recipe; the checkpoint's is {self.checkpoint_pooling}, and the base row keeps it)"
        head = "trained" if r.method == "full" or r.lora.train_head else "frozen"
        targets = f"; LoRA on {summarise(self.lora_targets)}" if self.lora_targets else ""
        self.echo(
            f"{self.choice.describe()}; method {r.method}; trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable / self.total:.2f}%){targets}; loss {describe_loss(r.loss, self.mini_batch_size)}"
            f"{'; gradient checkpointing' if r.train.gradient_checkpointing else ''}"
        )
        self.echo(
            f"model: {resolved.source} {resolved.path}: {describe_stack(self.model)}; pooling {pooling}; head "
            f"{head}; {self.prompts.describe()}"
        )

    def _negatives(self):
        from finetune.mining import find_negatives

        config, model = self.recipe.negatives, self.recipe.model
        if config.strategy == "none":
            return None
        return find_negatives(
            self.data,
            self.splits.train,
            config,
            model=self.reference,
            seed=self.recipe.seed,
            batch_size=model.batch_size,
            query_prompt=self.prompts.query,
            document_prompt=self.prompts.document,
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
        precision = resolved_precision(t, cuda, cuda and torch.cuda.is_bf16_supported())
        return precision, resolved_optimizer(t, cuda)

    def _max_steps(self, rows: int) -> int:
        """``train.max_steps`` caps the epochs: training stops at whichever comes first, so both settings act."""
        t = self.recipe.train
        if t.max_steps <= 0:
            return -1
        per_epoch = math.ceil(rows / (t.batch_size * distributed.world_size()))
        return min(t.max_steps, math.ceil(t.epochs * per_epoch))

    def _arguments(self, output_dir: Path, has_val: bool, columns: list[str], rows: int):
        import importlib.util

        from sentence_transformers import SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import BatchSamplers

        t, cuda = self.recipe.train, self.device == "cuda"
        precision, optimizer = self._precision_and_optimizer()
        metric = f"eval_val_{self.model.similarity_fn_name}_ndcg@10"
        return SentenceTransformerTrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=t.epochs,
            max_steps=self._max_steps(rows),
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
            # the query prompt on anchors, the document prompt on positives and negatives
            prompts=self.prompts.for_columns(columns) or None,
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
        )

    def fit(self, run_dir: Path, resume: bool = False) -> dict:
        """Score the base model, train, save the LoRA adapter and a merged model, score the merged model.

        With ``resume``, training continues from the newest complete checkpoint in
        ``run_dir/checkpoints`` (optimizer, scheduler, RNG and batch position included).
        Under several processes every rank trains (data-parallel, MNRL gathering the other
        ranks' embeddings as negatives) and only rank 0 writes the adapter and the model.
        """
        test = self._evaluator(self.splits.test, "test")
        base = evaluate(test, self.reference)  # the checkpoint exactly as SentenceTransformer(path) loads it
        t0 = time.perf_counter()
        also_base = {x.label: evaluate(self._extra_evaluator(x), self.reference) for x in self.extra}
        also_seconds = time.perf_counter() - t0
        dims_base = self._by_dimension(self.reference)
        interpolating = self.recipe.method == "full" and self.recipe.merge.scale != 1.0
        base_state = (
            {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} if interpolating else None
        )
        del self.reference

        t0 = time.perf_counter()
        trainer, result, resumed_from, timer = self._train(run_dir, resume)
        train_seconds = time.perf_counter() - t0
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank reads the best one
        self._restore_best(trainer)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        # the model that is exported: the checkpoint's full-precision weights plus the LoRA delta
        lora, scaled = self.recipe.method == "lora", self.recipe.merge.scale != 1.0
        built = lora and distributed.is_main() and (self.export or scaled)  # only rank 0 scores and writes it
        exported = self._unquantized_with_lora() if built else self.model
        merge = self._merge(run_dir, exported, base_state, test)
        tuned_trained = evaluate(test, self.model)
        # every rank logs this line; ranks that trained in step agree on it (the multi-process test reads it)
        logger.info(
            "rank %d/%d: steps %d, as-trained test ndcg@10 %.6f, lora sha256 %s",
            distributed.rank(),
            distributed.world_size(),
            result.global_step,
            tuned_trained["ndcg@10"],
            self._trainable_digest(),
        )
        if not distributed.is_main():
            return {"base": base, "tuned": tuned_trained}
        if self.export:
            merged, export = self._save(run_dir, exported)
            tuned = evaluate(test, merged)
        else:  # a sweep point: the model as trained, scored on validation, nothing written
            merged, export, tuned = self.model, None, tuned_trained
        t0 = time.perf_counter()
        scores = {
            "base": also_base,
            "tuned": {x.label: evaluate(self._extra_evaluator(x), merged) for x in self.extra},
        }
        also = score_extra_sets(self.extra, lambda x, which: scores[which][x.label])
        also_seconds += time.perf_counter() - t0
        matryoshka = {"base": dims_base, "tuned": self._by_dimension(merged)} if dims_base else None
        if matryoshka:
            self.echo(dims_line(dims_base, matryoshka["tuned"]))
        precision, optimizer = self._precision_and_optimizer()
        return {
            "base": base,
            "tuned": tuned,
            "per_query": {"base": base.per_query, "tuned": tuned.per_query},  # written by run_recipe
            "tuned_as_trained": tuned_trained,
            "backend": self.choice.describe(),
            "method": self.recipe.method,
            "model": {
                "stack": describe_stack(merged),
                "pooling": self.recipe.pooling if self.pooling_overridden else self.checkpoint_pooling,
                "checkpoint_pooling": self.checkpoint_pooling,
                "lora_targets": self.lora_targets,
                "head_trained": self.recipe.method == "full" or self.recipe.lora.train_head,
            },
            "prompts": {"query": self.prompts.query, "document": self.prompts.document},
            "fidelity": self.fidelity,
            "export": export,
            "negatives": self.negatives.stats if self.negatives else {"strategy": "none"},
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "document_embeddings_recomputed": True,
            "train_steps": result.global_step,
            "stopped_behind": self.behind.stopped if self.behind else None,
            "resumed_from_step": resumed_from,
            "train_loss": result.training_loss,
            "training_reused_from": str(self.trained_in) if self.trained_in else None,
            "log_history": trainer.state.log_history,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "peak_gpu_mb": gpu_peak,
            "memory_plan": self.memory.record(gpu_peak) if self.memory else None,
            "loss": describe_loss(self.recipe.loss, self.mini_batch_size),
            "matryoshka": matryoshka,
            "gpu": torch.cuda.get_device_name() if self.device == "cuda" else None,
            "precision": precision,
            "optimizer": optimizer,
            "batch_size": self.recipe.train.batch_size,
            # per_step includes evaluation and checkpointing; step_time counts optimizer steps only
            "also": also,
            "merge": merge,
            "seconds": {
                "train": train_seconds,
                "per_step": seconds_per_step(train_seconds, result.global_step, resumed_from),
                "evaluate_also": also_seconds,
            },
            "step_time": timer.summary(),
        }

    def _evaluator(self, ids: list[str], name: str):
        """The shared evaluator over ``ids``, with the run's query and document prompts."""
        return build_evaluator(
            self.data, ids, name, self.prompts.query, self.recipe.model.batch_size, corpus_prompt=self.prompts.document
        )

    def _merge(self, run_dir: Path, exported, base_state: dict | None, test) -> dict:
        """Put the trained model at ``merge.scale`` (``auto``: chosen on validation); return the choice.

        s is chosen on ``exported``, the model ``model/`` will hold: for LoRA the checkpoint's
        full-precision weights with the trained LoRA beside them, rescaled inside peft's
        ``rescale_adapter_scale``; then the B matrices of both that model and the training model
        are scaled, so ``lora/`` and ``model/`` hold base + s x delta. Full fine-tuning
        interpolates from the checkpoint's weights (``base_state``, taken before training).
        Once s is chosen, the test split is scored at s = 1 too, for the record only.
        """
        config, lora = self.recipe.merge, self.recipe.method == "lora"
        if config.scale == 1.0:
            return {"scale": 1.0}
        tuned_state = None if lora else _cpu_state(self.model)

        def at(s: float):
            if lora:
                return lora_scale(exported[0].auto_model, s)
            interpolate(self.model, base_state, tuned_state, s)
            return contextlib.nullcontext()

        grid, chosen, seconds, unscaled = None, config.scale, 0.0, {}
        if config.scale == "auto" and distributed.is_main():  # rank 0 chooses; the other ranks take its s
            val = self._evaluator(self.splits.val, "val")

            def validate(s: float) -> dict[str, float]:
                with at(s):
                    scores = {"in_domain": evaluate(val, exported)["ndcg@10"]}
                    for x in self.extra:
                        scores[x.label] = evaluate(self._extra_evaluator(x, "val"), exported)["ndcg@10"]
                return scores

            t0 = time.perf_counter()
            chosen, grid = choose_scale(config.grid, validate, config.max_drop)
            seconds = time.perf_counter() - t0
            if self.extra:
                plot_tradeoff(grid, chosen, run_dir / "merge.png", f"{self.recipe.name}: {self.recipe.method} x s")
        if distributed.is_main():
            with at(1.0):  # chosen already: s = 1 on test is a reference row, never an input to the choice
                unscaled = {"in_domain": evaluate(test, exported)["ndcg@10"]}
                unscaled |= {x.label: evaluate(self._extra_evaluator(x), exported)["ndcg@10"] for x in self.extra}
        chosen = distributed.share(chosen)
        if lora:
            scale_lora_in_place(self.model[0].auto_model, chosen)
            if exported is not self.model:
                scale_lora_in_place(exported[0].auto_model, chosen)
        else:
            at(chosen)
        self.echo(merge_line(chosen, grid is not None, unscaled))
        return {
            "scale": chosen,
            "max_drop": config.max_drop,
            "grid": grid,
            "seconds": seconds if grid else 0.0,
            "test_at_scale_1": unscaled,
        }

    def _by_dimension(self, model) -> dict | None:
        """Test NDCG@10 at each ``loss.matryoshka_dims`` size (encoded once, truncated), or None."""
        dims = self.recipe.loss.matryoshka_dims
        if not dims:
            return None
        return model_ndcg_by_dimension(
            model, self.data, self.splits.test, self.prompts, dims, self.recipe.model.batch_size
        )

    def _extra_evaluator(self, extra: ExtraSet, split: str = "test"):
        """The shared evaluator over an ``eval.also`` set's test (or val) split and full corpus."""
        return extra.evaluator(split, self.prompts.query, self.prompts.document, self.recipe.model.batch_size)

    def _train(self, run_dir: Path, resume: bool):
        """Train with MNRL (the no-duplicates sampler; validation NDCG@10 every ``eval_steps``)."""
        val = self._evaluator(self.splits.val, "val") if self.splits.val else None
        dataset = self._train_dataset()
        trainer = FinetuneTrainer(
            lora=self.recipe.method == "lora",
            model=self.model,
            args=self._arguments(run_dir / "checkpoints", val is not None, dataset.column_names, len(dataset)),
            train_dataset=dataset,
            loss=build_loss(self.model, self.recipe.loss, self.mini_batch_size, gather=distributed.world_size() > 1),
            evaluator=val,
        )
        timer = StepTimer(cuda=self.device == "cuda")
        trainer.add_callback(timer)
        self.behind = StopBehind(self.stop_behind, trainer.args.metric_for_best_model) if self.stop_behind else None
        if self.behind and val is not None:
            trainer.add_callback(self.behind)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if self.trained_in is not None and not resume:  # a sweep's final run: the chosen point trained this
            point = Path(self.trained_in)
            loss = json.loads((point / "metrics.json").read_text())["train_loss"]
            result = trainer.adopt(point / "checkpoints", loss)
            self.echo(f"training: the same as {self.trained_in} (recipe, splits, seed): its checkpoints are reused")
            return trainer, result, result.global_step, timer
        start = latest_checkpoint(run_dir / "checkpoints") if resume else None
        if resume:
            self.echo(
                f"resuming from {start}"
                if start
                else "no checkpoint was saved before the run stopped: training from the start"
            )
        try:
            result = trainer.train(resume_from_checkpoint=str(start) if start else None)
        except NonFiniteLoss as exc:
            last = latest_checkpoint(run_dir / "checkpoints")
            kept = f"the last good checkpoint is kept in {last}" if last else "no checkpoint was saved yet"
            raise FinetuneError(
                f"{exc}; training stopped and {kept}; lower train.lr or check the data", where="training"
            ) from None
        return trainer, result, int(start.name.split("-")[-1]) if start else None, timer

    def _restore_best(self, trainer) -> None:
        """Load the best checkpoint's LoRA weights (by validation NDCG@10) into the trained model."""
        best = trainer.state.best_model_checkpoint
        if self.recipe.method != "lora" or not self.recipe.train.load_best_model_at_end or not best:
            return
        load_lora_checkpoint(self.model, best)
        logger.info(
            "restored the best checkpoint %s (%s %.4f)",
            best,
            trainer.args.metric_for_best_model,
            trainer.state.best_metric,
        )

    def _trainable_digest(self) -> str:
        """A hash of the trained weights: equal on every rank when data-parallel training kept them in step."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def _unquantized_with_lora(self):
        """The checkpoint at full precision with the trained LoRA (and head) beside it, not merged yet."""
        import tempfile

        from peft import PeftModel

        model, _ = build_encoder(self.recipe, self.choice, quantize=False)
        with tempfile.TemporaryDirectory() as tmp:
            self.model[0].auto_model.save_pretrained(tmp)
            model[0].model = PeftModel.from_pretrained(model[0].auto_model, tmp)  # auto_model reads .model
        if self.recipe.lora.train_head:  # the trained Dense/other modules after the transformer
            for ours, trained in zip(list(model.children())[1:], list(self.model.children())[1:]):
                ours.load_state_dict({k: v.to(torch.float32) for k, v in trained.state_dict().items()})
        return model.to(self.device)

    def _save(self, run_dir: Path, exported):
        """Save ``lora/`` (peft format) and ``model/``: the merged encoder with the checkpoint's own
        pooling, head and prompts. Returns the merged model and the export check's numbers."""
        from finetune.adapter.export import save_model_folder

        if self.recipe.method == "lora":
            self.model[0].auto_model.save_pretrained(str(run_dir / "lora"))
            exported[0].model = exported[0].model.merge_and_unload()
        save_model_folder(exported, run_dir / "model")
        return exported, self._check_export(exported, run_dir / "model")

    def _check_export(self, merged, folder: Path) -> dict:
        """``SentenceTransformer(folder)``, with only its saved prompts, must give the merged model's embeddings."""
        from sentence_transformers import SentenceTransformer

        queries, documents = (
            [self.data.queries[q] for q in self.splits.test[:16]],
            [self.data.corpus[d] for d in list(self.data.corpus)[:16]],
        )
        reloaded = SentenceTransformer(str(folder), device=str(merged.device))
        drift = float((embed(merged, queries, documents) - embed(reloaded, queries, documents)).abs().max())
        if drift > 1e-4:
            raise RuntimeError(f"the exported model's embeddings differ from the merged model's by {drift:.2e}")
        # the merged full-precision model against the 4-bit (or 16-bit) model it was trained as
        as_trained = cosine_to(self.model, merged, queries, documents) if merged is not self.model else torch.ones(1)
        return {"max_abs_diff": drift, "as_trained_min_cosine": float(as_trained.min())}


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
