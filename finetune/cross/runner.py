"""Run a ``cross_adapter`` recipe: embed with both encoders once, run every experiment and method, export.

Embeddings (small model: documents and queries; large model: queries and documents; both: any
alignment texts) are computed once and cached; every experiment fits a fresh projection over them,
so a whole label-budget sweep or a 39-domain leave-one-out costs seconds per cell after the first
encoding. Every setting not learned from data (ridge, mix weight, label-training epoch) is chosen
on labelled non-test queries, never on the test split.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from finetune.adapter.negatives import NegativeSampler, build_sampler, relevant_pairs
from finetune.adapter.train import train_adapter
from finetune.atomic import write_json
from finetune.cache import EmbeddingCache
from finetune.cross.align import align_projection, alignment_texts, score_map
from finetune.cross.config import CrossAdapterRecipe
from finetune.cross.experiments import Experiment, budget_experiments, leave_one_domain_out, per_domain
from finetune.cross.extra import CrossExtraSets
from finetune.cross.projection import Projection, export_router_model, load_projection, save_projection
from finetune.cross.summary import METRICS, write_summary
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate
from finetune.extra_sets import load_extra_sets
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
    export = True  # sweeps refuse cross_adapter recipes, which choose their settings inside the run

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

        banned = set(data.queries.values())  # query text reaches alignment only through use_queries
        self.extra_texts = alignment_texts(recipe.alignment.texts, banned) if self._aligns_on_texts() else []

        # eval.also sets load (and fail, naming the entry) before anything is embedded
        sets = load_extra_sets(recipe.eval.also, recipe.splits, recipe.seed)
        self.extra = CrossExtraSets(sets, recipe.projection.input == "both")
        t0 = time.perf_counter()
        small, self.small_queries, self.small_docs, self.small_extra = self._embed("small", cache)
        large, self.large_queries, self.large_docs, self.large_extra = self._embed("large", cache)
        self.small, self.large = small.model, large.model
        self.prompts = {"large": large.prompts, "small": small.prompts}
        self.encode_seconds = time.perf_counter() - t0
        self.model_source = {"query_model": large.source, "document_model": small.source}
        self.dims = (self.large_queries.shape[1], self.small_docs.shape[1])
        self.both = recipe.projection.input == "both"
        # what a projection reads per query: [q_large ; q_small] for input both, q_large for ERA's input large
        self.inputs = torch.cat([self.large_queries, self.small_queries], 1) if self.both else self.large_queries
        self.init = self._saved_projection(recipe.projection.init) if recipe.projection.init else None
        self._aligned: dict[tuple, list] = {}
        self._zero_shot: dict[tuple, dict] = {}
        self._evaluators: dict[tuple, object] = {}
        self.sampler = self._sampler()  # here, so a problem with the negatives stops the run before it writes

    def _saved_projection(self, path: str) -> Projection:
        """``projection.init``, checked against these encoders' widths and the recipe's input form."""
        saved = load_projection(path)
        want = (*self.dims, self.recipe.projection.input)
        if (saved.d_in, saved.d_out, saved.input) != want:
            raise FinetuneError(
                f"holds a {saved.d_in}->{saved.d_out} input {saved.input} projection; these models need "
                f"{want[0]}->{want[1]} input {want[2]}: point at a projection/ trained with the same two encoders",
                where=f"projection.init {path}",
            )
        return saved

    def _aligns_on_texts(self) -> bool:
        return self.recipe.alignment.texts is not None and self.recipe._aligns()

    def _experiments(self) -> list[Experiment]:
        r = self.recipe
        out = budget_experiments(self.splits, r.train_ratios, r.seed)
        if r.domains.leave_one_domain_out:
            out += leave_one_domain_out(self.data, r.domains.min_queries, r.splits.val_fraction, r.seed)
        if r.domains.per_domain:
            out += per_domain(self.data, r.domains.min_queries, r.domains.test_fraction, r.seed)
        return out

    def _embed(
        self, side: str, cache: EmbeddingCache
    ) -> tuple[FrozenEncoder, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Load one encoder (``small`` or ``large``) and its cached query, document, alignment-text and
        ``eval.also`` embeddings."""
        config = self.recipe.document_model if side == "small" else self.recipe.query_model
        encoder = load_frozen_encoder(config, self.device)
        encode = dict(
            model=encoder.model, identity=encoder.identity, batch_size=config.batch_size, devices=config.encode_devices
        )
        queries = cache.encode(texts=self.query_texts, task="query", prompt=encoder.prompts.query, **encode)
        docs = cache.encode(texts=self.doc_texts, task="document", prompt=encoder.prompts.document, **encode)
        extra = torch.zeros(0, docs.shape[1])
        if self.extra_texts:
            extra = cache.encode(texts=self.extra_texts, task="document", prompt=encoder.prompts.document, **encode)
        self.extra.embed(side, encoder, cache, encode)
        self.echo(f"{config.name}: {encoder.source}; {encoder.prompts.describe()}")
        return encoder, queries, docs, extra

    def lookup(self, queries: torch.Tensor, documents: torch.Tensor, projection=None) -> EmbeddingLookup:
        """Cached embeddings as a model for the evaluator; queries go through ``projection`` if given."""
        transform = None if projection is None else (lambda q: projection(q.to(self.device)).cpu())
        return EmbeddingLookup(self.query_texts, queries, self.doc_texts, documents, transform)

    def score(self, ids: list[str], queries: torch.Tensor, documents: torch.Tensor, projection=None) -> dict:
        """The shared evaluator's metrics for query ``ids`` against the whole corpus."""
        key = tuple(ids)
        if key not in self._evaluators:  # selection scores the same queries for every ridge x mix point
            self._evaluators[key] = build_evaluator(self.data, ids, "test")
        return evaluate(
            self._evaluators[key], self.lookup(queries, documents, projection), corpus_embeddings=documents
        )

    def projected(self, ids: list[str], projection: Projection) -> dict:
        """Metrics of ``projection``'s queries against the small model's (unchanged) document index."""
        return self.score(ids, self.inputs, self.small_docs, projection)

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

    def _rows(self, ids: list[str]) -> list[int]:
        return sorted({self._row_of_text[self.data.queries[q]] for q in ids})

    def align(self, objective: str, unlabelled: list[str]) -> list[tuple[dict, Projection]]:
        """Phase 1 over the corpus, the alignment texts and (``use_queries``) the text of ``unlabelled``
        queries: one ``input: large`` projection per candidate setting. Memoised, as it uses no labels."""
        config = self.recipe.alignment
        key = (objective, frozenset(unlabelled) if config.use_queries else frozenset())
        if key not in self._aligned:
            rows = self._rows(key[1])
            small = torch.cat([self.small_docs, self.small_extra]).to(self.device)
            large = torch.cat([self.large_docs, self.large_extra]).to(self.device)
            out = []
            if objective == "scores":
                # the queries weight the score error by the directions queries use; the texts keep every other
                # direction weighted, so a handful of probe queries (one domain's) cannot leave the map blind
                probes = torch.cat([self.large_queries[rows].to(self.device), large]) if rows else None
                for ridge in sorted(config.ridge, reverse=True):  # select() keeps the first of equals: more ridge
                    projection = self._fresh_projection("large")
                    projection.set_map(score_map(small, large, ridge, probes))
                    out.append(({"ridge": ridge}, projection))
            else:
                source = torch.cat([large, self.large_queries[rows].to(self.device)])
                target = torch.cat([small, self.small_queries[rows].to(self.device)])
                projection = self._fresh_projection("large")
                history = align_projection(projection, source, target, config, self.recipe.seed)
                loss = {"before": history[0]["loss"], "after": history[-1]["loss"], "epochs": len(history) - 1}
                out.append(({"alignment_loss": loss}, projection))
            self._aligned[key] = out
        return self._aligned[key]

    def select(self, candidates: list[tuple[dict, Projection]], experiment: Experiment) -> tuple[Projection, dict]:
        """The candidate (and, for ``input: both``, the mix weight) with the best NDCG@10 on the experiment's
        labelled queries. Alignment fitted no label, so its train queries are held out for it too; ties go
        to the larger ridge and the smaller mix (the one closer to the small model)."""
        ids = experiment.train + experiment.val
        probes = self.large_queries[self._rows(experiment.unlabelled or ids)].to(self.device)
        grid = []
        for setting, projection in candidates:
            for mix in self.recipe.alignment.mix if self.both else [None]:
                p = projection if mix is None else projection.mixed(mix, probes)
                choice = {**setting, **({} if mix is None else {"mix": mix})}
                grid.append((self.projected(ids, p)["ndcg@10"], choice, p))
        best = max(grid, key=lambda g: g[0])  # max keeps the first of equals: the smallest mix
        chosen = {**best[1], "selection_ndcg@10": best[0], "selection_queries": len(ids)}
        chosen["grid"] = [{**c, "ndcg@10": s} for s, c, _ in grid]
        return best[2], chosen

    def _fresh_projection(self, input: str | None = None) -> Projection:
        torch.manual_seed(self.recipe.seed)  # every cell starts from the same initialisation
        p = self.recipe.projection
        return Projection(*self.dims, p.type, p.hidden_dim, input or p.input).to(self.device)

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

    def train(self, mode: str, objective: str | None, experiment: Experiment) -> tuple[Projection, dict]:
        """A projection fitted by ``mode`` (and alignment ``objective``) on ``experiment``'s queries."""
        info = {}
        if mode in ("alignment_only", "both"):
            projection, info["alignment"] = self.select(self.align(objective, experiment.unlabelled), experiment)
            projection = copy.deepcopy(projection)
        elif self.init is not None:
            projection = copy.deepcopy(self.init).to(self.device)
        else:  # input both: f starts at zero, so epoch 0 is the small model alone
            projection = self._fresh_projection()
        if mode in ("label_only", "both") and self.both and not experiment.val:
            # nothing to choose an epoch on: the starting point (the small model, or the alignment's choice) stays
            info["label_training"] = "skipped: no validation queries to keep a better epoch on"
        elif mode in ("label_only", "both"):
            validate = None
            if experiment.val:
                val = build_evaluator(self.data, experiment.val, "val")

                def validate(p):
                    lookup = self.lookup(self.inputs, self.small_docs, p)
                    return evaluate(val, lookup, corpus_embeddings=self.small_docs)["ndcg@10"]

            pairs = relevant_pairs(self.data, experiment.train, self._row_of_text, self._row_of_doc)
            info["history"] = train_adapter(
                projection,
                self.inputs.to(self.device),
                self.small_docs.to(self.device),
                pairs,
                self.sampler,
                self.recipe.loss,
                self.recipe.train,
                self.recipe.seed,
                validate,
            )
        projection.eval()
        return projection, info

    def fit(self, run_dir: Path, resume: bool = False) -> dict:
        """Run every experiment and method, write summary, meta, projection and model; return the metrics.

        ``resume`` is refused before this runs (:meth:`finetune.kinds.RecipeKind.refuse_resume`); here too.
        """
        if resume:
            KINDS[self.recipe.kind].refuse_resume()
        recipe, methods = self.recipe, self.recipe.methods()
        export_exp = max((e for e in self.experiments if e.group == "budget"), key=lambda e: e.ratio)
        rows, candidates, t0 = [], [], time.perf_counter()
        for exp in self.experiments:
            base = {
                "group": exp.group,
                "experiment": exp.name,
                "ratio": exp.ratio,
                "domain": exp.domain,
                "labelled": len(exp.train) + len(exp.val),  # queries whose labels the cell may read
            }
            small_val = self.score(exp.val, self.small_queries, self.small_docs)["ndcg@10"] if exp.val else None
            for test_name, ids in exp.tests.items():
                for label, metrics in self.zero_shot(ids).items():
                    val = small_val if label == "small model alone" else None
                    rows.append(_row(base, test_name, ids, label, 0, metrics, val))
            for mode, objective in methods:
                projection, info = self.train(mode, objective, exp)
                val = self.projected(exp.val, projection)["ndcg@10"] if exp.val else None
                name = recipe.method_name(mode, objective)
                for test_name, ids in exp.tests.items():
                    metrics = self.projected(ids, projection)
                    small = self.zero_shot(ids)["small model alone"]
                    row = _row(
                        base, test_name, ids, name, 0 if mode == "alignment_only" else len(exp.train), metrics, val
                    )
                    # paired NDCG@10 difference to the small model alone on the same test queries
                    row["vs_small"] = paired_metric(small.per_query, metrics.per_query, seed=recipe.seed)
                    row["chosen"] = {k: v for k, v in info.get("alignment", {}).items() if k != "grid"}
                    rows.append(row)
                    if exp is export_exp and test_name == "test":
                        candidates.append((val, projection.cpu(), info, metrics, name))
                logger.info("%s %s: %s", exp.name, name, round(rows[-1]["ndcg@10"], 4))
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
                "input": recipe.projection.input,
            },
        )
        # exported: the method with the best validation NDCG@10 at the largest budget (the first without val)
        _, projection, info, tuned, name = max(candidates, key=lambda c: -1.0 if c[0] is None else c[0])
        save_projection(projection, run_dir / "projection")
        drift = self._export(run_dir, projection)
        zero = self.zero_shot(export_exp.tests["test"])
        t0 = time.perf_counter()
        also = self.extra.score(projection.to(self.device), self.device)
        also_seconds = time.perf_counter() - t0
        return {
            "base": zero["small model alone"],
            "large_model_alone": zero["large model alone"],
            "tuned": tuned,
            "per_query": {
                "base": zero["small model alone"].per_query,
                "tuned": tuned.per_query,
            },  # written by run_recipe
            "exported": {
                "method": name,
                "chosen_on": "validation NDCG@10" if export_exp.val else "first method (no validation queries)",
                "ratio": export_exp.ratio,
                "train_queries": len(export_exp.train),
                **info,
            },
            "input": recipe.projection.input,
            "alignment_texts": len(self.extra_texts),
            "dims": {"query_model": self.dims[0], "document_model": self.dims[1]},
            "trainable_parameters": sum(p.numel() for p in projection.parameters()),
            "document_embeddings_recomputed": False,
            "model_source": self.model_source,
            "export_max_abs_diff": drift,
            "also": also,
            "seconds": {"encode": self.encode_seconds, "train": train_seconds, "evaluate_also": also_seconds},
        }

    def _export(self, run_dir: Path, projection: Projection) -> dict | None:
        """Save ``model/`` (both encoders local) and check it gives the toolkit's embeddings; else say why not."""
        if not self.recipe.local_models():
            self.echo(
                "model/: not written, as an API encoder has no weights to save; projection/ holds the trained map "
                "(apply it to the API model's normalised query embeddings)"
            )
            return None
        large, small = self.prompts["large"], self.prompts["small"]
        model = export_router_model(
            self.large,
            self.small,
            projection,
            run_dir / "model",
            query_prompt=large.query,
            document_prompt=small.document,
            small_query_prompt=small.query,
        )
        return self._check_export(model, projection)

    def _check_export(self, exported, projection: Projection) -> dict:
        """The exported Router model must give the toolkit's query and document embeddings."""
        texts = [self.data.queries[q] for q in self.splits.test[:16]]
        ours = self.lookup(self.inputs, self.small_docs, projection.to(self.device)).encode_query(texts)
        theirs = exported.encode_query(texts, convert_to_tensor=True).cpu()
        docs = exported.encode_document(self.doc_texts[:16], convert_to_tensor=True).cpu()
        drift = {
            "query": float((ours - theirs).abs().max()),
            "document": float((self.small_docs[:16] - docs).abs().max()),
        }
        if max(drift.values()) > 1e-3:
            raise RuntimeError(f"exported model's embeddings differ from training's: {drift} (prompts {self.prompts})")
        return drift


def _row(base: dict, test_set: str, ids: list, model: str, train_queries: int, metrics: dict, val) -> dict:
    """One summary row: where, which test set, which model or method, its test metrics and val NDCG@10."""
    picked = {k: metrics[k] for k in METRICS}
    return {
        **base,
        "test_set": test_set,
        "n_test": len(ids),
        "model": model,
        "train_queries": train_queries,
        **picked,
        "val_ndcg@10": val,
    }
