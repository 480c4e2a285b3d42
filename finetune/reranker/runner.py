"""Run a ``reranker`` recipe: fine-tune a cross-encoder and score it as the second stage behind the retriever.

Set up (the constructor) loads the retriever, encodes the corpus once, mines the training negatives from it,
reads its top documents for the validation and test queries, and loads the reranker; nothing is written
until all of that has worked. :meth:`RerankerRun.train` scores the retriever alone (the ``base`` row) and
trains; :meth:`RerankerRun.finish` exports ``model/``, chooses k on validation and scores the two stages on
test (the ``tuned`` row), with the same evaluator, per-query rows and paired interval as every other kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune.atomic import write_text
from finetune.base_corpus import BaseCorpus
from finetune.contract import Start
from finetune.errors import FinetuneError
from finetune.evaluation import build_evaluator, evaluate
from finetune.lora_targets import summarise
from finetune.mining import find_negatives
from finetune.models import load_sentence_transformer
from finetune.outcome import Outcome
from finetune.qlora.backend import require_libraries
from finetune.reranker import model as reranking
from finetune.reranker.config import RerankerRecipe
from finetune.reranker.second_stage import choose_k, first_stage, reranked, reranker_logits, score
from finetune.reranker.train import pairs_dataset, train
from finetune.stages import stage


class RerankerRun:
    """Everything loaded and checked before the run directory exists.

    Args:
        recipe: The validated recipe.
        data: Its data.
        splits: Its splits.
        device: Where to train.
        cache: Unused (the retriever's corpus is encoded once per run).
        echo: Where progress lines go.
        options: What the caller decides (reranker runs always export).
    """

    def __init__(self, recipe: RerankerRecipe, data, splits, device: str, cache=None, echo=print, options=None):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        _check_can_run(recipe, splits, device)
        self.retriever, resolved, self.prompts = load_sentence_transformer(
            recipe.retriever, device, field="retriever.name"
        )
        batch = recipe.retriever.batch_size
        self.corpus = BaseCorpus(self.retriever, data, self.prompts, batch)
        self.negatives = find_negatives(
            data,
            splits.train,
            recipe.negatives,
            model=self.corpus.as_model(),
            seed=recipe.seed,
            batch_size=batch,
            query_prompt=self.prompts.query,
            document_prompt=self.prompts.document,
        )
        self.first = {
            name: first_stage(self.retriever, self.corpus.embeddings, data, ids, self.prompts, batch)
            for name, ids in (("val", splits.val), ("test", splits.test))
            if ids
        }
        self.model, self.head, self.targets = reranking.load_reranker(recipe, device)
        trainable, total = reranking.trainable_counts(self.model)
        lora = f"; LoRA on {summarise(self.targets)}" if self.targets else ""
        echo(
            f"reranker: {recipe.model.name}, method {recipe.method}, quantization {recipe.quantization}, max length "
            f"{self.model.max_length}; trainable {trainable:,} of {total:,} parameters{lora}"
        )
        echo(self.head.line())
        echo(f"retriever: {resolved.source} {resolved.path}; {self.prompts.describe()}")
        self.trainable = trainable

    def train(self, run_dir: Path, start: Start) -> None:
        """1. the retriever alone on test (``base``); 2. train the reranker."""
        self.test_evaluator = self._evaluator("test")  # base here, the two stages in finish
        self.base = evaluate(self.test_evaluator, self.retriever, corpus_embeddings=self.corpus.embeddings)
        dataset = pairs_dataset(self.data, self.splits.train, self.negatives)
        self.training = train(self.model, self.recipe, dataset, self.device, run_dir / "checkpoints")
        self.rows = len(dataset)

    def finish(self, run_dir: Path) -> Outcome:
        """3. export ``model/``; 4. choose k on validation; 5. the two stages on test, with the exported reranker."""
        with stage("export"):
            exported, reloaded = reranking.export(self.recipe, self.model, self.device, run_dir / "model")
        batch = self.recipe.model.batch_size
        chosen, by_k, cost = self._choose_k(exported)
        t0 = time.perf_counter()
        logits = reranker_logits(exported, self.data, self.first["test"], chosen, batch)
        per_query = (time.perf_counter() - t0) / max(1, len(self.splits.test))
        tuned = score(self.test_evaluator, reranked(self.first["test"], logits, chosen))
        _write_logits(run_dir / "reranked_test.jsonl", self.first["test"], logits)
        sample = self.first["test"].pairs(self.data, max(chosen, 10))[: reranking.CHECK_PAIRS]
        checks = {
            "pairs": len(sample),
            "max_abs_diff": reranking.max_difference(exported, reloaded, sample, batch),
            "as_trained_max_abs_diff": reranking.max_difference(self.model, exported, sample, batch),
        }
        self.echo(
            f"rerank.k = {chosen}{' (chosen on validation: ' + _ks(by_k) + ')' if by_k else ''}; reranking "
            f"{1000 * per_query:.1f} ms a query; model/ reloads as CrossEncoder(path) within "
            f"{checks['max_abs_diff']:.1e}"
        )
        record = {
            "retriever": self.recipe.retriever.name,
            "reranker": {
                "head": self.head.kind,
                "architecture": self.head.architecture,
                "trainable_parameters": self.trainable,
                "lora_targets": self.targets,
                "train_pairs": self.rows,
                "steps": self.training.steps,
                "train_loss": self.training.loss,
                "log_history": self.training.log,
                "k": chosen,
                "val_ndcg_by_k": by_k,
                "export_check": checks,
            },
        }
        seconds = {"train": self.training.seconds, "rerank_per_query": per_query, **cost}
        return Outcome(self.base, tuned, record, seconds=seconds, exported=exported, card=self._card(chosen))

    def _card(self, k: int) -> dict:
        """What the model card says of this reranker (:func:`finetune.model_card.write_model_card`)."""
        r = self.recipe
        how = {"full": "full fine-tuning", "lora": "LoRA" if r.quantization == "none" else "QLoRA (4-bit NF4 + LoRA)"}
        return {
            "base": r.model.name,
            "base_label": "retriever alone",
            "method": f"{how[r.method]} of a cross-encoder, BinaryCrossEntropyLoss, {self.training.steps} steps on "
            f"{self.rows:,} (query, document) pairs with negatives mined by the retriever; {self.head.line()}",
            "changed": f"A second stage: it reorders the top {k} of the retriever `{r.retriever.name}` (k chosen on "
            "validation; 0 means the retriever alone scored best). The retriever and its index are unchanged.",
        }

    def _choose_k(self, reranker) -> tuple[int, dict | None, dict]:
        """``rerank.k``, or for ``auto`` the grid's best on validation: ``(k, NDCG@10 by k, seconds a validation
        query took to rerank at the grid's largest k, whichever k won)``."""
        k = self.recipe.rerank.k
        if k != "auto":
            return k, None, {}
        grid = self.recipe.rerank.grid
        t0 = time.perf_counter()
        logits = reranker_logits(reranker, self.data, self.first["val"], max(grid), self.recipe.model.batch_size)
        cost = {f"rerank_per_query_at_k{max(grid)}": (time.perf_counter() - t0) / len(self.splits.val)}
        evaluator = self._evaluator("val")
        by_k = {g: score(evaluator, reranked(self.first["val"], logits, g))["ndcg@10"] for g in grid}
        return choose_k(by_k), by_k, cost

    def _evaluator(self, split: str):
        ids = self.splits.test if split == "test" else self.splits.val
        return build_evaluator(
            self.data,
            ids,
            split,
            self.prompts.query,
            self.recipe.retriever.batch_size,
            corpus_prompt=self.prompts.document,
        )


def _write_logits(path: Path, first, logits: dict) -> None:
    """Each test query's reranked documents (the retriever's top k, in its order) and the exported reranker's logits:
    what ``CrossEncoder(run/model)`` must reproduce."""
    rows = [{"query": q, "documents": first.ranked[q][: len(v)], "logits": v} for q, v in logits.items()]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _ks(by_k: dict) -> str:
    return ", ".join(f"k={k} {v:.4f}" for k, v in by_k.items())


def _check_can_run(recipe: RerankerRecipe, splits, device: str) -> None:
    """What the recipe needs and this machine or split lacks, in one line, before anything loads."""
    if recipe.rerank.k == "auto" and not splits.val:
        raise FinetuneError(
            "rerank.k auto chooses k on validation queries and this run has none; set splits.val_fraction above 0, "
            "or give rerank.k",
            where="recipe: rerank.k",
        )
    require_libraries(recipe, device)
