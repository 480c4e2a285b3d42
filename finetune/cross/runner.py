"""Run a ``cross_adapter`` recipe: embed with both encoders once, run every experiment and mode, export.

Embeddings (small model: documents and queries; large model: queries and documents) are computed
once and cached; every experiment trains a fresh projection over them, so a whole label-budget
sweep or a 39-domain leave-one-out costs seconds per cell after the first encoding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from finetune.adapter.negatives import NegativeSampler, build_sampler, relevant_pairs
from finetune.adapter.train import train_adapter
from finetune.atomic import write_json
from finetune.cache import EmbeddingCache
from finetune.cross.align import align_projection
from finetune.cross.config import CrossAdapterRecipe
from finetune.cross.experiments import Experiment, budget_experiments, leave_one_domain_out, per_domain
from finetune.cross.projection import Projection, export_router_model, save_projection
from finetune.cross.summary import METRICS, write_summary
from finetune.data.dataset import RetrievalData
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate
from finetune.kinds import KINDS
from finetune.models import FrozenEncoder, load_frozen_encoder
from finetune.significance import paired_metric
from finetune.splits import Splits

logger = logging.getLogger(__name__)


class CrossAdapterRun:
    """Both encoders' embeddings and the experiments, loaded and checked before any output is written.

    Args:
        recipe: The validated recipe.
        data: Its data.
        splits: Its splits (the fixed test split of the label-budget sweep).
        device: Where to train.
        cache: The embedding cache.
        echo: Where progress lines go.
    """

    resumable = False  # each cell trains in seconds: a stopped run starts again

    def __init__(
        self,
        recipe: CrossAdapterRecipe,
        data: RetrievalData,
        splits: Splits,
        device: str,
        cache: EmbeddingCache,
        echo=print,
    ):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        self.experiments = self._experiments()
        self.query_texts = list(dict.fromkeys(data.queries.values()))
        self.doc_ids = list(data.corpus)
        self.doc_texts = [data.corpus[d] for d in self.doc_ids]
        self._row_of_text = {t: i for i, t in enumerate(self.query_texts)}
        self._row_of_doc = {d: i for i, d in enumerate(self.doc_ids)}

        t0 = time.perf_counter()
        small, self.small_queries, self.small_docs = self._embed(recipe.document_model, cache)
        large, self.large_queries, self.large_docs = self._embed(recipe.query_model, cache)
        self.small, self.large = small.model, large.model
        # the exported Router applies one query prompt (the large model's) and one document prompt (the small one's)
        self.export_prompts = {"query": large.prompts.query, "document": small.prompts.document}
        self.encode_seconds = time.perf_counter() - t0
        self.model_source = {"query_model": large.source, "document_model": small.source}
        self.dims = (self.large_queries.shape[1], self.small_docs.shape[1])
        self._aligned: dict[frozenset, tuple[dict, list]] = {}
        self._zero_shot: dict[tuple, dict] = {}
        self.sampler = self._sampler()  # here, so a problem with the negatives stops the run before it writes

    def _experiments(self) -> list[Experiment]:
        r = self.recipe
        out = budget_experiments(self.splits, r.train_ratios, r.seed)
        if r.domains.leave_one_domain_out:
            out += leave_one_domain_out(self.data, r.domains.min_queries, r.splits.val_fraction, r.seed)
        if r.domains.per_domain:
            out += per_domain(self.data, r.domains.min_queries, r.domains.test_fraction, r.seed)
        return out

    def _embed(self, config, cache: EmbeddingCache) -> tuple[FrozenEncoder, torch.Tensor, torch.Tensor]:
        """Load one encoder and its (cached) query and document embeddings."""
        encoder = load_frozen_encoder(config, self.device)
        encode = dict(
            model=encoder.model, identity=encoder.identity, batch_size=config.batch_size, devices=config.encode_devices
        )
        queries = cache.encode(texts=self.query_texts, task="query", prompt=encoder.prompts.query, **encode)
        docs = cache.encode(texts=self.doc_texts, task="document", prompt=encoder.prompts.document, **encode)
        self.echo(f"{config.name}: {encoder.source}; {encoder.prompts.describe()}")
        return encoder, queries, docs

    def lookup(self, queries: torch.Tensor, documents: torch.Tensor, projection=None) -> EmbeddingLookup:
        """Cached embeddings as a model for the evaluator; queries go through ``projection`` if given."""
        transform = None if projection is None else (lambda q: projection(q.to(self.device)).cpu())
        return EmbeddingLookup(self.query_texts, queries, self.doc_texts, documents, transform)

    def score(
        self, ids: list[str], queries: torch.Tensor, documents: torch.Tensor, projection=None, name: str = "test"
    ) -> dict:
        """The shared evaluator's metrics for query ``ids`` against the whole corpus."""
        evaluator = build_evaluator(self.data, ids, name)
        return evaluate(evaluator, self.lookup(queries, documents, projection), corpus_embeddings=documents)

    def zero_shot(self, ids: list[str]) -> dict[str, dict]:
        """Small model alone, large model alone, and (equal widths only) large queries against small documents."""
        key = tuple(ids)
        if key not in self._zero_shot:
            rows = {
                "small model alone": self.score(ids, self.small_queries, self.small_docs),
                "large model alone": self.score(ids, self.large_queries, self.large_docs),
            }
            if self.dims[0] == self.dims[1]:
                rows["large queries, small documents"] = self.score(ids, self.large_queries, self.small_docs)
            self._zero_shot[key] = rows
        return self._zero_shot[key]

    def align(self, unlabelled: list[str]) -> tuple[dict, list]:
        """Phase 1 over the corpus and the text of ``unlabelled`` queries; memoised, as it uses no labels."""
        key = frozenset(unlabelled) if self.recipe.alignment.use_queries else frozenset()
        if key not in self._aligned:
            rows = sorted({self._row_of_text[self.data.queries[q]] for q in key})
            source = torch.cat([self.large_docs, self.large_queries[rows]]).to(self.device)
            target = torch.cat([self.small_docs, self.small_queries[rows]]).to(self.device)
            projection = self._fresh_projection()
            history = align_projection(projection, source, target, self.recipe.alignment, self.recipe.seed)
            self._aligned[key] = ({k: v.clone() for k, v in projection.state_dict().items()}, history)
        return self._aligned[key]

    def _fresh_projection(self) -> Projection:
        torch.manual_seed(self.recipe.seed)  # every cell starts from the same initialisation
        p = self.recipe.projection
        return Projection(*self.dims, p.type, p.hidden_dim).to(self.device)

    def _sampler(self) -> NegativeSampler:
        # mined negatives: what the existing small-model index ranks highest. Every query gets its
        # own (from its own labels only), since leave-one-domain-out trains on queries of any split.
        sampler, _ = build_sampler(
            self.data,
            self.recipe.negatives,
            self.small_docs.to(self.device),
            self._row_of_text,
            self._row_of_doc,
            list(self.data.queries),
            self.lookup(self.small_queries, self.small_docs),
            self.recipe.seed,
        )
        return sampler

    def train(self, mode: str, experiment: Experiment, sampler: NegativeSampler) -> tuple[Projection, dict]:
        """A projection trained by ``mode`` on ``experiment``'s queries, and what happened."""
        projection, info = self._fresh_projection(), {}
        if mode in ("alignment_only", "both"):
            state, history = self.align(experiment.unlabelled)
            projection.load_state_dict(state)
            info["alignment_loss"] = {
                "before": history[0]["loss"],
                "after": history[-1]["loss"],
                "epochs": len(history) - 1,
            }
        if mode in ("label_only", "both"):
            validate = None
            if experiment.val:
                val = build_evaluator(self.data, experiment.val, "val")

                def validate(p):
                    lookup = self.lookup(self.large_queries, self.small_docs, p)
                    return evaluate(val, lookup, corpus_embeddings=self.small_docs)["ndcg@10"]

            pairs = relevant_pairs(self.data, experiment.train, self._row_of_text, self._row_of_doc)
            info["history"] = train_adapter(
                projection,
                self.large_queries.to(self.device),
                self.small_docs.to(self.device),
                pairs,
                sampler,
                self.recipe.loss,
                self.recipe.train,
                self.recipe.seed,
                validate,
            )
        projection.eval()
        return projection, info

    def fit(self, run_dir: Path, resume: bool = False) -> dict:
        """Run every experiment and mode, write summary, meta, projection and model; return the metrics.

        ``resume`` is refused before this runs (:meth:`finetune.kinds.RecipeKind.refuse_resume`); here too.
        """
        if resume:
            KINDS[self.recipe.kind].refuse_resume()
        recipe, modes = self.recipe, self.recipe.modes()
        sampler = self.sampler
        export_exp = max((e for e in self.experiments if e.group == "budget"), key=lambda e: e.ratio)
        rows, exported, t0 = [], None, time.perf_counter()
        for exp in self.experiments:
            base = {"group": exp.group, "experiment": exp.name, "ratio": exp.ratio, "domain": exp.domain}
            for test_name, ids in exp.tests.items():
                for label, metrics in self.zero_shot(ids).items():
                    rows.append(
                        {
                            **base,
                            "test_set": test_name,
                            "n_test": len(ids),
                            "model": label,
                            "train_queries": 0,
                            **_pick(metrics),
                        }
                    )
            for mode in modes:
                projection, info = self.train(mode, exp, sampler)
                labelled = 0 if mode == "alignment_only" else len(exp.train)
                scores = {
                    name: self.score(ids, self.large_queries, self.small_docs, projection)
                    for name, ids in exp.tests.items()
                }
                for test_name, metrics in scores.items():
                    small = self.zero_shot(exp.tests[test_name])["small model alone"]
                    rows.append(
                        {
                            **base,
                            "test_set": test_name,
                            "n_test": len(exp.tests[test_name]),
                            "model": mode,
                            "train_queries": labelled,
                            **_pick(metrics),
                            # paired NDCG@10 difference to the small model alone on the same test queries
                            "vs_small": paired_metric(small.per_query, metrics.per_query, seed=self.recipe.seed),
                        }
                    )
                if exp is export_exp and mode == modes[0]:
                    exported = (projection.cpu(), info, scores["test"])
                logger.info(
                    "%s %s: %s",
                    exp.name,
                    mode,
                    {r["test_set"]: round(r["ndcg@10"], 4) for r in rows[-len(exp.tests) :]},
                )
        train_seconds = time.perf_counter() - t0

        write_json(
            run_dir / "meta.json",
            {"recipe": recipe.model_dump(mode="json"), "experiments": [vars(e) for e in self.experiments]},
        )
        write_summary(
            run_dir,
            rows,
            {
                "query_model": recipe.query_model.name,
                "document_model": recipe.document_model.name,
                "dims": list(self.dims),
            },
        )
        projection, info, tuned = exported
        save_projection(projection, run_dir / "projection")
        model = export_router_model(
            self.large,
            self.small,
            projection,
            run_dir / "model",
            query_prompt=self.export_prompts["query"],
            document_prompt=self.export_prompts["document"],
        )
        zero = self.zero_shot(export_exp.tests["test"])
        return {
            "base": zero["small model alone"],
            "large_model_alone": zero["large model alone"],
            "tuned": tuned,
            "per_query": {
                "base": zero["small model alone"].per_query,
                "tuned": tuned.per_query,
            },  # written by run_recipe
            "exported": {"mode": modes[0], "ratio": export_exp.ratio, "train_queries": len(export_exp.train), **info},
            "dims": {"query_model": self.dims[0], "document_model": self.dims[1]},
            "trainable_parameters": sum(p.numel() for p in projection.parameters()),
            "document_embeddings_recomputed": False,
            "model_source": self.model_source,
            "export_max_abs_diff": self._check_export(model, projection),
            "seconds": {"encode": self.encode_seconds, "train": train_seconds},
        }

    def _check_export(self, exported, projection: Projection) -> dict:
        """The exported Router model must give the toolkit's query and document embeddings."""
        texts = [self.data.queries[q] for q in self.splits.test[:16]]
        ours = self.lookup(self.large_queries, self.small_docs, projection.to(self.device)).encode_query(texts)
        theirs = exported.encode_query(texts, convert_to_tensor=True).cpu()
        docs = exported.encode_document(self.doc_texts[:16], convert_to_tensor=True).cpu()
        drift = {
            "query": float((ours - theirs).abs().max()),
            "document": float((self.small_docs[:16] - docs).abs().max()),
        }
        if max(drift.values()) > 1e-3:
            raise RuntimeError(
                f"exported model's embeddings differ from training's: {drift} (prompts {self.export_prompts})"
            )
        return drift


def _pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in METRICS}
