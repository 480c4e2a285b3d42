"""Run a ``cross_adapter`` recipe: embed with both encoders once, run every experiment and method, export.

Embeddings (small model: documents and queries; large model: queries and documents; both: any
alignment texts) are computed once and cached (:mod:`finetune.cross.side`); every experiment fits
a fresh projection over them (:mod:`finetune.cross.cells`), so a whole label-budget sweep or a
39-domain leave-one-out costs seconds per cell after the first encoding. Every setting not learned
from data (ridge, mix weight, label-training epoch) is chosen on labelled non-test queries, never on
the test split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from finetune.atomic import write_json
from finetune.cache import EmbeddingCache
from finetune.contract import RunOptions, Start
from finetune.cross.align import alignment_texts
from finetune.cross.cells import Cell, Cells
from finetune.cross.config import CrossAdapterRecipe
from finetune.cross.experiments import Experiment, budget_experiments, leave_one_domain_out, per_domain
from finetune.cross.export import card_facts, export_router_model
from finetune.cross.extra import CrossExtraSets
from finetune.cross.projection import Projection, load_projection, save_projection
from finetune.cross.side import embed_side
from finetune.cross.summary import METRICS, write_summary
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.extra_sets import load_extra_sets
from finetune.outcome import Outcome
from finetune.precision import deployment_precision, relevant_rows
from finetune.significance import paired_metric
from finetune.splits import Splits
from finetune.stages import stage

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
        options: What the caller decides (:class:`~finetune.contract.RunOptions`); ``export=False``
            writes no ``projection/`` or ``model/``.
    """

    def __init__(
        self,
        recipe: CrossAdapterRecipe,
        data: RetrievalData,
        splits: Splits,
        device: str,
        cache: EmbeddingCache,
        echo=print,
        options: RunOptions = RunOptions(),
    ):
        self.recipe, self.data, self.splits, self.device, self.echo = recipe, data, splits, device, echo
        self.options = options
        self.experiments = self._experiments()
        # the budget sweep's largest ratio is the one whose best method is exported
        self.export_experiment = max((e for e in self.experiments if e.group == "budget"), key=lambda e: e.ratio)
        query_texts = list(dict.fromkeys(data.queries.values()))
        doc_texts = [data.corpus[d] for d in data.corpus]
        banned = set(data.queries.values())  # query text reaches alignment only through use_queries
        aligns_on_texts = recipe.alignment.texts is not None and recipe.aligns()
        self.extra_texts = alignment_texts(recipe.alignment.texts, banned) if aligns_on_texts else []

        # eval.also sets load (and fail, naming the entry) before anything is embedded
        sets = load_extra_sets(recipe.eval.also, recipe.splits, recipe.seed)
        self.also = CrossExtraSets(sets, recipe.projection.input == "both")
        t0 = time.perf_counter()
        texts = (query_texts, doc_texts, self.extra_texts, cache, self.also, device, echo)
        small = embed_side("small", recipe.document_model, *texts)
        large = embed_side("large", recipe.query_model, *texts)
        self.encode_seconds = time.perf_counter() - t0
        self.dims = (large.width, small.width)
        init = self._saved_projection(recipe.projection.init) if recipe.projection.init else None
        self.cells = Cells(recipe, data, small, large, query_texts, device, init)

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

    def _experiments(self) -> list[Experiment]:
        r = self.recipe
        out = budget_experiments(self.splits, r.train_ratios, r.seed)
        if r.domains.leave_one_domain_out:
            out += leave_one_domain_out(self.data, r.domains.min_queries, r.splits.val_fraction, r.seed)
        if r.domains.per_domain:
            out += per_domain(self.data, r.domains.min_queries, r.domains.test_fraction, r.seed)
        return out

    def train(self, run_dir: Path, start: Start) -> None:
        """Every experiment: the zero-shot rows, then each method's cell, fitted and scored on its test sets.

        Runs always start fresh: the kind is not ``resumable`` (:mod:`finetune.kinds` refuses ``--resume``)
        and not ``sweepable`` (so nothing adopts a sweep point).
        """
        if start.mode != "fresh":
            raise ValueError(f"cross_adapter runs start fresh, not {start.mode}")  # refused before set-up
        self.rows: list[dict] = []
        self.exportable: list[Cell] = []
        t0 = time.perf_counter()
        for experiment in self.experiments:
            self.rows += self._experiment_rows(experiment)
        self.train_seconds = time.perf_counter() - t0

    def _experiment_rows(self, exp: Experiment) -> list[dict]:
        """One experiment's summary rows: the models alone on each test set, then every method's cell."""
        cells, seed = self.cells, self.recipe.seed
        where = {
            "group": exp.group,
            "experiment": exp.name,
            "ratio": exp.ratio,
            "domain": exp.domain,
            "labelled": len(exp.train) + len(exp.val),  # queries whose labels the cell may read
        }
        small_val = (
            cells.score(exp.val, cells.small.queries, cells.small.docs, split="val")["ndcg@10"] if exp.val else None
        )
        rows = []
        for test_name, ids in exp.tests.items():
            for label, metrics in cells.zero_shot(ids).items():
                val = small_val if label == "small model alone" else None
                rows.append(_row(where, test_name, ids, label, 0, metrics, val))
        for mode, objective in self.recipe.methods():
            projection, info = cells.fit(mode, objective, exp)
            val = cells.projected(exp.val, projection, "val")["ndcg@10"] if exp.val else None
            name = self.recipe.method_name(mode, objective)
            labelled = 0 if mode == "alignment_only" else len(exp.train)
            for test_name, ids in exp.tests.items():
                metrics = cells.projected(ids, projection, "test")
                row = _row(where, test_name, ids, name, labelled, metrics, val)
                # paired NDCG@10 difference to the small model alone on the same test queries
                row["vs_small"] = paired_metric(
                    cells.zero_shot(ids)["small model alone"].per_query, metrics.per_query, seed=seed
                )
                row["chosen"] = {k: v for k, v in info.get("alignment", {}).items() if k != "grid"}
                rows.append(row)
                if exp is self.export_experiment and test_name == "test":
                    self.exportable.append(Cell(name, projection.cpu(), info, val, metrics))
            logger.info("%s %s: %s", exp.name, name, round(rows[-1]["ndcg@10"], 4))
        return rows

    def finish(self, run_dir: Path) -> Outcome:
        """Write meta and summary; export the method with the best validation NDCG@10 at the largest budget
        (the first method without validation queries); score it on the ``eval.also`` sets."""
        recipe, exp = self.recipe, self.export_experiment
        experiments = [vars(e) for e in self.experiments]
        write_json(run_dir / "meta.json", {"recipe": recipe.model_dump(mode="json"), "experiments": experiments})
        models = {"query_model": recipe.query_model.name, "document_model": recipe.document_model.name}
        write_summary(run_dir, self.rows, {**models, "dims": list(self.dims), "input": recipe.projection.input})
        cell = max(self.exportable, key=Cell.rank)  # max keeps the first of equals
        drift = exported = None
        if self.options.export:
            save_projection(cell.projection, run_dir / "projection")
            with stage("export"):
                exported, drift = self._export(run_dir, cell.projection)
        zero = self.cells.zero_shot(exp.tests["test"])
        precision = self._precision(exp.tests["test"], cell.projection)
        t0 = time.perf_counter()
        also = self.also.score(cell.projection.to(self.device), self.device)
        also_seconds = time.perf_counter() - t0
        record = {
            "large_model_alone": zero["large model alone"],
            "exported": {
                "method": cell.method,
                "chosen_on": "validation NDCG@10" if exp.val else "first method (no validation queries)",
                "ratio": exp.ratio,
                "train_queries": len(exp.train),
                **cell.info,
            },
            "input": recipe.projection.input,
            "alignment_texts": len(self.extra_texts),
            "dims": {"query_model": self.dims[0], "document_model": self.dims[1]},
            "trainable_parameters": sum(p.numel() for p in cell.projection.parameters()),
            "document_embeddings_recomputed": False,
            "model_source": {
                "query_model": self.cells.large.encoder.source,
                "document_model": self.cells.small.encoder.source,
            },
            "export_max_abs_diff": drift,
            "precision": precision,
        }
        seconds = {
            "encode": self.encode_seconds,
            "train": self.train_seconds,
            "evaluate_also": also_seconds,
        }
        card = card_facts(recipe, cell.method)
        return Outcome(
            zero["small model alone"], cell.test, record, also, seconds=seconds, exported=exported, card=card
        )

    def _precision(self, ids: list[str], projection: Projection) -> dict:
        """Test NDCG@10 with the small model's document index stored at lower precision: the small model's
        own queries (base) and the projected ones (tuned)."""
        cells, texts = self.cells, [self.data.queries[q] for q in ids]
        docs = cells.small.docs
        base = cells.lookup(cells.small.queries, docs).encode_query(texts)
        tuned = cells.lookup(cells.inputs, docs, projection.to(self.device)).encode_query(texts)
        return deployment_precision(relevant_rows(self.data, ids), {"base": (base, docs), "tuned": (tuned, docs)})

    def _export(self, run_dir: Path, projection: Projection) -> tuple:
        """Save ``model/`` (both encoders local) and check it gives the toolkit's embeddings; else say why not.

        Returns:
            ``(model, drift)``: the exported model and its check; ``(None, None)`` when nothing was saved.
        """
        if not self.recipe.local_models():
            self.echo(
                "model/: not written, as an API encoder has no weights to save; projection/ holds the trained map "
                "(apply it to the API model's normalised query embeddings)"
            )
            return None, None
        large, small = self.cells.large.encoder.prompts, self.cells.small.encoder.prompts
        model = export_router_model(
            self.cells.large.encoder.model,
            self.cells.small.encoder.model,
            projection,
            run_dir / "model",
            query_prompt=large.query,
            document_prompt=small.document,
            small_query_prompt=small.query,
        )
        return model, self._check_export(model, projection)

    def _check_export(self, exported, projection: Projection) -> dict:
        """The exported Router model must give the toolkit's query and document embeddings."""
        texts = [self.data.queries[q] for q in self.splits.test[:16]]
        cells = self.cells
        ours = cells.lookup(cells.inputs, cells.small.docs, projection.to(self.device)).encode_query(texts)
        theirs = exported.encode_query(texts, convert_to_tensor=True).cpu()
        docs = exported.encode_document(cells.doc_texts[:16], convert_to_tensor=True).cpu()
        drift = {
            "query": float((ours - theirs).abs().max()),
            "document": float((cells.small.docs[:16] - docs).abs().max()),
        }
        if max(drift.values()) > 1e-3:
            prompts = {
                "query": cells.large.encoder.prompts.describe(),
                "document": cells.small.encoder.prompts.describe(),
            }
            raise RuntimeError(f"exported model's embeddings differ from training's: {drift} (prompts {prompts})")
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
