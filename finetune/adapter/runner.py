"""Run an ``adapter`` recipe: cache embeddings, score the base model, train, score, export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from finetune.adapter.checkpoint import load_training_state
from finetune.adapter.config import AdapterRecipe
from finetune.adapter.export import card_facts, export_adapter_model
from finetune.adapter.modules import build_adapter, save_adapter
from finetune.adapter.negatives import build_sampler, relevant_pairs
from finetune.adapter.train import train_adapter
from finetune.cache import EmbeddingCache
from finetune.contract import RunOptions, Start
from finetune.data.dataset import RetrievalData
from finetune.data.readers import read_rows, read_text
from finetune.errors import FinetuneError
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate
from finetune.extra_sets import ExtraSet, load_extra_sets
from finetune.matryoshka import check_against_dimension, dims_line, ndcg_by_dimension
from finetune.merge_scale import check_can_choose_scale, scale_adapter
from finetune.models import load_frozen_encoder
from finetune.outcome import Outcome, choose_merge, score_also, swapped
from finetune.precision import deployment_precision, relevant_rows
from finetune.splits import Splits
from finetune.stages import stage

logger = logging.getLogger(__name__)
CURRENT = object()  # _score's default: the adapter _at() put in place


class AdapterRun:
    """Everything an adapter run needs, loaded and checked before any output is written.

    Args:
        recipe: The validated recipe.
        data: Its data.
        splits: Its splits.
        device: Where to train.
        cache: The embedding cache.
        echo: Where progress lines go (rank 0's print).
        options: What the caller decides (:class:`~finetune.kinds.RunOptions`: export or not).
    """

    def __init__(
        self,
        recipe: AdapterRecipe,
        data: RetrievalData,
        splits: Splits,
        device: str,
        cache: EmbeddingCache,
        echo=print,
        options: RunOptions = RunOptions(),
    ):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        self.options, self._evaluators, self._current = options, {}, None
        encoder = load_frozen_encoder(recipe.model, device)
        self.model, self.model_source, self.prompts = encoder.model, encoder.source, encoder.prompts
        echo(f"model: {self.model_source}; {self.prompts.describe()}")
        self.query_texts = list(dict.fromkeys(data.queries.values()))
        self.doc_ids = list(data.corpus)
        self._row_of_text = {t: i for i, t in enumerate(self.query_texts)}
        self._row_of_doc = {d: i for i, d in enumerate(self.doc_ids)}
        t0 = time.perf_counter()
        encode = dict(
            model=self.model,
            identity=encoder.identity,
            batch_size=recipe.model.batch_size,
            devices=recipe.model.encode_devices,
        )
        self.documents = cache.encode(
            texts=[data.corpus[d] for d in self.doc_ids], task="document", prompt=self.prompts.document, **encode
        )
        self.queries = cache.encode(texts=self.query_texts, task="query", prompt=self.prompts.query, **encode)
        check_against_dimension(recipe.loss.matryoshka_dims, self.documents.shape[1], recipe.model.name)
        # eval.also: each extra set's corpus and queries are cached like the training data's
        self.extra = load_extra_sets(recipe.eval.also, recipe.splits, recipe.seed)
        check_can_choose_scale(recipe, splits, self.extra)
        self.extra_embeddings = [x.embed(cache, self.prompts, encode) for x in self.extra]
        self.seconds = {"encode": time.perf_counter() - t0}
        pool = self._negative_pool(cache, encode)
        # mined/BM25 negatives are found here, so a problem with them stops the run before it writes anything
        self.sampler, self.negatives_stats = build_sampler(
            data,
            recipe.negatives,
            self.documents.to(device),
            self._row_of_text,
            self._row_of_doc,
            splits.train,
            self.lookup(),
            recipe.seed,
            pool=None if pool is None else pool.to(device),
        )

    def _negative_pool(self, cache: EmbeddingCache, encode: dict) -> torch.Tensor | None:
        negatives = self.recipe.negatives
        if negatives.strategy != "random" or negatives.pool != "file":
            return None
        path = Path(negatives.file)
        if path.suffix.lower() in (".txt", ".md"):
            if not path.is_file():
                raise FinetuneError("file not found", where=f"negatives.file {path}")
            texts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        else:
            texts = [str(r.get("text", "")).strip() for r in read_rows(path)]
            texts = [t for t in texts if t]
        if not texts:
            raise FinetuneError(
                "no texts found (one per line, or rows with a 'text' field)", where=f"negatives.file {path}"
            )
        return cache.encode(texts=texts, task="document", **encode)

    def lookup(self, adapter=None) -> EmbeddingLookup:
        """The cached embeddings as a model for the evaluator; queries go through ``adapter`` if given."""
        transform = None
        if adapter is not None:
            transform = lambda q: adapter(q.to(self.device)).cpu()  # noqa: E731
        doc_texts = [self.data.corpus[d] for d in self.doc_ids]
        return EmbeddingLookup(self.query_texts, self.queries, doc_texts, self.documents, transform)

    def pairs(self, query_ids: list[str]) -> torch.Tensor:
        """``[P, 2]`` (query row, document row) for every relevant document of ``query_ids``."""
        return relevant_pairs(self.data, query_ids, self._row_of_text, self._row_of_doc)

    def train(self, run_dir: Path, start: Start) -> None:
        """Score the base model on test, then train the adapter (``start`` resume: from
        ``run_dir/checkpoint/state.pt`` when it exists)."""
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        t0 = time.perf_counter()
        self.base = self._score("test", None)
        self.seconds["evaluate_base"] = time.perf_counter() - t0
        adapter = build_adapter(
            recipe.adapter.type, self.documents.shape[1], recipe.adapter.hidden_dim, recipe.adapter.dropout
        ).to(self.device)
        validate = None
        if self.splits.val:
            validate = lambda a: self._score("val", None, a)["ndcg@10"]  # noqa: E731
        checkpoint = run_dir / "checkpoint" / "state.pt"
        state = load_training_state(checkpoint) if start.mode == "resume" and checkpoint.is_file() else None
        self.resumed_from_epoch = state["epoch"] if state else None
        t0 = time.perf_counter()
        self.history = train_adapter(
            adapter,
            self.queries.to(self.device),
            self.documents.to(self.device),
            self.pairs(self.splits.train),
            self.sampler,
            recipe.loss,
            recipe.train,
            recipe.seed,
            validate,
            checkpoint=checkpoint,
            resume_from=state,
        )
        self.seconds["train"] = time.perf_counter() - t0
        self.trained = adapter

    def finish(self, run_dir: Path) -> Outcome:
        """Choose the merge scale, score tuned on test (and the extra sets), save the adapter and export."""
        scale, merge = choose_merge(
            self.recipe, self._at, self._score, self.extra, run_dir, "adapter residual", self.echo
        )
        adapter = self.trained if scale == 1.0 else scale_adapter(self.trained, scale)
        tuned = self._score("test", None, adapter)
        matryoshka = self._by_dimension(adapter) if self.recipe.loss.matryoshka_dims else None
        queries = self._test_queries(adapter)  # the document index is the base model's, at every precision
        precision = deployment_precision(
            relevant_rows(self.data, self.splits.test), {k: (q, self.documents) for k, q in queries.items()}
        )
        also, self.seconds["evaluate_also"] = score_also(
            self.extra, lambda split, x: self._score(split, x, None), lambda split, x: self._score(split, x, adapter)
        )
        adapter = adapter.cpu()
        save_adapter(adapter, run_dir / "adapter")
        drift = exported = None
        if self.recipe.model.provider == "local" and self.options.export:  # an API model has no weights to save
            with stage("export"):
                exported = export_adapter_model(self.model, adapter, run_dir / "model")
                drift = self._check_export(exported, adapter)
        record = {
            "history": self.history,
            "train_pairs": len(self.pairs(self.splits.train)),
            "resumed_from_epoch": self.resumed_from_epoch,
            "negatives": self.negatives_stats,
            "trainable_parameters": sum(p.numel() for p in adapter.parameters()),
            "document_embeddings_recomputed": False,
            "model_source": self.model_source,
            "prompts": {"query": self.prompts.query, "document": self.prompts.document},
            "export_max_abs_diff": drift,
            "precision": precision,
        }
        seconds = {k: self.seconds[k] for k in ("encode", "train", "evaluate_base", "evaluate_also")}
        card = card_facts(self.recipe, record["trainable_parameters"])
        return Outcome(self.base, tuned, record, also, merge, matryoshka, seconds, exported, card)

    def _score(self, split: str, extra: ExtraSet | None, adapter=CURRENT) -> dict:
        """The evaluator's metrics on ``split`` of the run's data (or of an ``eval.also`` set), queries
        through ``adapter`` (None: the base model; by default the one :meth:`_at` put in place)."""
        adapter = self._current if adapter is CURRENT else adapter
        if extra is not None:
            documents, queries = self.extra_embeddings[self.extra.index(extra)]
            transform = None if adapter is None else (lambda q: adapter(q.to(self.device)).cpu())
            return extra.score_embeddings(queries, documents, transform, split, self.recipe.model.batch_size)
        if split not in self._evaluators:
            ids = self.splits.test if split == "test" else self.splits.val
            self._evaluators[split] = build_evaluator(self.data, ids, split, batch_size=self.recipe.model.batch_size)
        return evaluate(self._evaluators[split], self.lookup(adapter), corpus_embeddings=self.documents)

    def _at(self, s: float):
        """The trained adapter with its residual scaled by ``s``, in place for :meth:`_score`."""
        return swapped(self, "_current", scale_adapter(self.trained, s))

    def _test_queries(self, adapter) -> dict[str, torch.Tensor]:
        """The test queries' embeddings, ``base`` (cached) and ``tuned`` (through ``adapter``)."""
        rows = torch.tensor([self._row_of_text[self.data.queries[q]] for q in self.splits.test], dtype=torch.long)
        with torch.no_grad():
            return {"base": self.queries[rows], "tuned": adapter(self.queries[rows].to(self.device)).cpu()}

    def _by_dimension(self, adapter) -> dict:
        """Test NDCG@10 at each ``loss.matryoshka_dims`` size, base and tuned (truncated, not re-encoded)."""
        scores = {
            which: ndcg_by_dimension(self.data, self.splits.test, q, self.documents, self.recipe.loss.matryoshka_dims)
            for which, q in self._test_queries(adapter).items()
        }
        self.echo(dims_line(scores["base"], scores["tuned"]))
        return scores

    def _check_export(self, exported, adapter) -> float:
        """The exported model, with its own saved prompts, must give the toolkit's adapted query
        embeddings and the cached document embeddings (a few test queries, a few documents)."""
        texts = [self.data.queries[q] for q in self.splits.test[:16]]
        ours = self.lookup(adapter).encode_query(texts)
        theirs = exported.encode_query(texts, convert_to_tensor=True).cpu()
        docs = exported.encode_document([self.data.corpus[d] for d in self.doc_ids[:16]], convert_to_tensor=True).cpu()
        drift = max(float((ours - theirs).abs().max()), float((self.documents[:16] - docs).abs().max()))
        if drift > 1e-3:
            raise RuntimeError(f"exported model's embeddings differ from training's by {drift:.2e}")
        return drift
