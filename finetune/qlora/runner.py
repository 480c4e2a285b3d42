"""Run a ``qlora`` recipe: 4-bit/16-bit LoRA or full fine-tuning through SentenceTransformerTrainer.

The run reads as its phases: set up (the constructor: backend, the checkpoint as ``SentenceTransformer(path)``
loads it, the memory plan at the data's text lengths, the training stack checked against it, negatives), then
:meth:`QLoRARun.train` (base row, train, restore the best checkpoint) and :meth:`QLoRARun.finish`
(merge scale, export, tuned row). Training itself is :mod:`finetune.qlora.train`; the export and
its checks are :mod:`finetune.qlora.export`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from finetune import distributed
from finetune.base_corpus import BaseCorpus
from finetune.contract import RunOptions, Start
from finetune.data.dataset import RetrievalData
from finetune.evaluation import build_evaluator, evaluate
from finetune.extra_sets import ExtraSet, load_extra_sets
from finetune.lora_targets import summarise
from finetune.matryoshka import check_against_dimension, dims_line, model_ndcg_by_dimension
from finetune.memory.lengths import column_lengths
from finetune.merge_scale import check_can_choose_scale, interpolate, lora_scale, scale_lora_in_place
from finetune.models import describe_stack, load_sentence_transformer
from finetune.onnx_export import require_onnx
from finetune.outcome import Outcome, choose_merge, score_also
from finetune.precision import model_precision
from finetune.qlora import export
from finetune.qlora import train as training
from finetune.qlora.backend import build_checked, parameter_counts, select_backend, training_sample
from finetune.qlora.config import QLoRARecipe
from finetune.qlora.losses import build_loss, describe_loss
from finetune.qlora.plan import negative_columns, plan_run, with_checkpointing
from finetune.qlora.record import card_facts, qlora_record
from finetune.qlora.stack import pooling_mode
from finetune.qlora.teacher import check_teacher, prepare_teacher
from finetune.qlora.trainer import FinetuneTrainer
from finetune.splits import Splits
from finetune.stages import stage
from finetune.timing import rss_bytes, seconds_per_step

logger = logging.getLogger(__name__)
# the as-trained check's documents at most: a diagnostic, encoded by the 4-bit model (slower than float32 on a CPU)
AS_TRAINED_DOCUMENTS = 5_000


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
        options: What the caller decides (:class:`~finetune.contract.RunOptions`: export, stop behind).
    """

    def __init__(
        self,
        recipe: QLoRARecipe,
        data: RetrievalData,
        splits: Splits,
        device: str,
        cache=None,
        echo=print,
        options: RunOptions = RunOptions(),
    ):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        self.options, self._evaluators = options, {}
        if recipe.export.onnx and options.export:
            require_onnx()
        teacher = check_teacher(recipe.teacher)  # a teacher it cannot use is refused before the corpus is encoded
        self.choice = select_backend(recipe, device)
        process = rss_bytes()  # before the checkpoint loads: the plan counts its float32 copy itself
        self.reference, resolved, self.prompts = load_sentence_transformer(recipe.model, device)
        negatives = negative_columns(recipe) > 0
        lengths = column_lengths(self.reference, self.prompts, data, splits.train, negatives)  # what a step pads to
        self.memory, self.mini_batch_size, ckpt = plan_run(
            recipe, device, self.choice.backend, echo, data, lengths, process, teacher
        )
        self.recipe = recipe = with_checkpointing(recipe, ckpt)  # auto resolved: what later steps read
        check_against_dimension(
            recipe.loss.matryoshka_dims, self.reference.get_embedding_dimension(), recipe.model.name
        )
        self.checkpoint_pooling = pooling_mode(self.reference)
        self.pooling_overridden = recipe.pooling != "auto" and recipe.pooling != self.checkpoint_pooling
        queries, documents = training_sample(data, splits.train)
        self.model, self.lora_targets, self.fidelity = build_checked(
            recipe, self.choice, self.reference, queries, documents, self.pooling_overridden
        )
        self.trainable, self.total = parameter_counts(self.model)
        # the checkpoint's corpus embeddings, once: the base row, mining and validation's candidate set share them
        self.base_corpus = BaseCorpus(self.reference, data, self.prompts, recipe.model.batch_size)
        cap = recipe.train.val_documents
        self.val_candidates = self.base_corpus.candidates(splits.val, cap, recipe.seed) if splits.val else None
        # what merging changed is measured on the test queries' candidates, not on a second full-corpus pass;
        # a sweep point (no export) reports the as-trained model itself, so it keeps the whole corpus
        check = AS_TRAINED_DOCUMENTS if cap == "all" else min(cap, AS_TRAINED_DOCUMENTS)
        self.test_candidates = self.base_corpus.candidates(splits.test, check, recipe.seed) if options.export else None
        self.negatives = self._negatives()
        self.teacher = prepare_teacher(recipe, data, splits.train, self.negatives, device, echo, teacher)
        self.extra = load_extra_sets(recipe.eval.also, recipe.splits, recipe.seed)
        check_can_choose_scale(recipe, splits, self.extra)
        self._say_what_runs(resolved)

    def _say_what_runs(self, resolved) -> None:
        r = self.recipe
        pooling = self.checkpoint_pooling
        if self.pooling_overridden:
            pooling = f"{r.pooling} (recipe; the checkpoint's is {self.checkpoint_pooling}, and the base row keeps it)"
        head = "trained" if r.method == "full" or r.lora.train_head else "frozen"
        loss = describe_loss(r.loss, self.mini_batch_size, self.teacher)
        targets = f"; LoRA on {summarise(self.lora_targets)}" if self.lora_targets else ""
        self.echo(
            f"{self.choice.describe()}; method {r.method}; trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable / self.total:.2f}%){targets}; loss {loss}"
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
            model=self.base_corpus.as_model(),
            seed=self.recipe.seed,
            batch_size=model.batch_size,
            query_prompt=self.prompts.query,
            document_prompt=self.prompts.document,
        )

    def train(self, run_dir: Path, start: Start) -> None:
        """1. score the base model (test, extra sets, Matryoshka sizes); 2. train from ``start``;
        3. restore the best checkpoint. Under several processes every rank trains (data-parallel,
        MNRL gathering the other ranks' embeddings as negatives)."""
        self._scored = self.reference  # the checkpoint exactly as SentenceTransformer(path) loads it
        self.base = self._score("test", None, corpus_embeddings=self.base_corpus.embeddings)
        t0 = time.perf_counter()
        self.also_base = {x.label: self._score("test", x) for x in self.extra}  # before training moves the model
        self.also_seconds = time.perf_counter() - t0
        self.dims_base = self._by_dimension(self.reference)
        if self.options.export:  # the base model and its corpus embeddings are gone once training starts
            base = self.reference, self.data, self.splits.test, self.prompts, self.recipe.model.batch_size
            self.precision = {"base": model_precision(*base, self.base_corpus.embeddings)}
        interpolating = self.recipe.method == "full" and self.recipe.merge.scale != 1.0
        self.base_state = _cpu_state(self.model) if interpolating else None
        del self.reference, self._scored, self.base_corpus

        dataset = training.train_dataset(self.data, self.splits.train, self.negatives, self.teacher)
        val = self._evaluator(self.splits.val, "val") if self.splits.val else None
        metric = f"eval_val_{self.model.similarity_fn_name}_ndcg@10" if val else None
        prompts = self.prompts.for_columns(dataset.column_names) or None
        trainer = FinetuneTrainer(
            lora=self.recipe.method == "lora",
            model=self.model,
            args=training.arguments(self.recipe, self.device, run_dir / "checkpoints", metric, prompts, len(dataset)),
            train_dataset=dataset,
            loss=build_loss(
                self.model, self.recipe.loss, self.mini_batch_size, distributed.world_size() > 1, self.teacher
            ),
            evaluator=val,
        )
        self.training = training.train(trainer, run_dir, start, self.device, self.options.stop_behind, self.echo)
        self.adopted = start.point if start.mode == "adopt" else None
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank reads the best one
        training.restore_best(trainer, self.recipe, self.model)
        self.gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None

    def finish(self, run_dir: Path) -> Outcome:
        """4. merge at the chosen scale; 5. export ``model/`` and check it; 6. score the tuned model."""
        # the model that is exported: the checkpoint's full-precision weights plus the LoRA delta
        lora, scaled = self.recipe.method == "lora", self.recipe.merge.scale != 1.0
        built = lora and distributed.is_main() and (self.options.export or scaled)  # only rank 0 scores and writes
        self._scored = self.model
        if built:
            with stage("export"):
                self._scored = export.unquantized_with_lora(self.recipe, self.choice, self.model, self.device)
        merge = self._merge(run_dir)
        check = "as_trained" if self.options.export else "test"  # a sweep point reports this row itself
        tuned_trained = evaluate(self._evaluator(self.splits.test, check), self.model)
        result = self.training.result
        # every rank logs this line; ranks that trained in step agree on it (the multi-process test reads it)
        logger.info(
            "rank %d/%d: steps %d, as-trained test ndcg@10 %.6f, lora sha256 %s",
            distributed.rank(),
            distributed.world_size(),
            result.global_step,
            tuned_trained["ndcg@10"],
            training.trainable_digest(self.model),
        )
        if not distributed.is_main():
            return Outcome(self.base, tuned_trained)
        checked = None
        if self.options.export:
            tuned, checked = export.export_and_score(self, run_dir, tuned_trained)
        else:  # a sweep point: the model as trained, scored on validation, nothing written
            self._scored, tuned = self.model, tuned_trained
        also, seconds = score_also(self.extra, lambda _, x: self.also_base[x.label], self._score)
        matryoshka = None
        if self.dims_base:
            matryoshka = {"base": self.dims_base, "tuned": self._by_dimension(self._scored)}
            self.echo(dims_line(self.dims_base, matryoshka["tuned"]))
        record = qlora_record(self, self._scored, tuned_trained, checked)
        record["precision"] = self.precision if self.options.export else None
        record["teacher"] = self.teacher.record if self.teacher else None
        seconds = {
            "train": self.training.seconds,
            "per_step": seconds_per_step(self.training.seconds, result.global_step, self.training.resumed_from),
            "evaluate_also": self.also_seconds + seconds,
        }
        exported, card = (self._scored, card_facts(self.recipe, record)) if self.options.export else (None, {})
        return Outcome(self.base, tuned, record, also, merge, matryoshka, seconds, exported, card)

    def _merge(self, run_dir: Path) -> dict:
        """Put the trained model at ``merge.scale`` (``auto``: chosen on validation); return the choice.

        s is chosen on the model ``model/`` will hold: for LoRA the checkpoint's full-precision
        weights with the trained LoRA beside them, rescaled inside peft's ``rescale_adapter_scale``;
        then the B matrices of both that model and the training model are scaled, so ``lora/`` and
        ``model/`` hold base + s x delta. Full fine-tuning interpolates from the checkpoint's weights
        (taken before training).
        """
        lora, exported = self.recipe.method == "lora", self._scored
        tuned_state = None if lora or self.recipe.merge.scale == 1.0 else _cpu_state(self.model)

        def at(s: float):
            if lora:
                return lora_scale(exported[0].auto_model, s)
            interpolate(self.model, self.base_state, tuned_state, s)
            return contextlib.nullcontext()

        what = f"{self.recipe.method}"
        chosen, record = choose_merge(self.recipe, at, self._score, self.extra, run_dir, what, self.echo)
        if self.recipe.merge.scale == 1.0:
            return record
        if lora:
            scale_lora_in_place(self.model[0].auto_model, chosen)
            if exported is not self.model:
                scale_lora_in_place(exported[0].auto_model, chosen)
        else:
            at(chosen)
        return record

    def _score(self, split: str, extra: ExtraSet | None, corpus_embeddings=None) -> dict:
        """The evaluator's metrics of the model in place (``_scored``) on ``split`` of the run's data, or of
        an ``eval.also`` set (``corpus_embeddings``: the run's corpus, already encoded by that model)."""
        if extra is not None:
            evaluator = extra.evaluator(split, self.prompts.query, self.prompts.document, self.recipe.model.batch_size)
        else:
            if split not in self._evaluators:
                self._evaluators[split] = self._evaluator(
                    self.splits.test if split == "test" else self.splits.val, split
                )
            evaluator = self._evaluators[split]
        return evaluate(evaluator, self._scored, corpus_embeddings)

    def _evaluator(self, ids: list[str], name: str):
        """The shared evaluator over ``ids``, with the run's query and document prompts; validation scores
        against its candidate set (``train.val_documents``), the as-trained check against the test queries'
        (:func:`~finetune.qlora.export.export_and_score`), the test split against the whole corpus."""
        candidates = {"val": self.val_candidates, "as_trained": self.test_candidates}
        return build_evaluator(
            self.data,
            ids,
            name,
            self.prompts.query,
            self.recipe.model.batch_size,
            corpus_prompt=self.prompts.document,
            corpus_ids=candidates.get(name),
        )

    def _by_dimension(self, model) -> dict | None:
        """Test NDCG@10 at each ``loss.matryoshka_dims`` size (encoded once, truncated), or None."""
        dims, batch = self.recipe.loss.matryoshka_dims, self.recipe.model.batch_size
        return model_ndcg_by_dimension(model, self.data, self.splits.test, self.prompts, dims, batch) if dims else None


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
