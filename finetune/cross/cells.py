"""The cells of a cross-adapter run: one projection fitted per experiment and method, over cached embeddings.

A cell is fitted in up to two phases. Alignment (no labels) gives :class:`Candidate` projections,
one per ridge for ``scores`` or one for ``identical_text``; :meth:`Cells.select` keeps the candidate
(and, for ``input: both``, the mix weight) with the best NDCG@10 on the experiment's labelled
queries. Label training then fine-tunes the projection on the experiment's train queries with the
adapter's loop, keeping the best validation epoch. Everything is scored by the shared evaluator
against the small model's (unchanged) document index.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from finetune.adapter.negatives import build_sampler, relevant_pairs
from finetune.adapter.train import train_adapter
from finetune.cross.align import align_projection, score_map
from finetune.cross.config import CrossAdapterRecipe
from finetune.cross.experiments import Experiment
from finetune.cross.projection import Projection
from finetune.cross.side import Side
from finetune.data.dataset import RetrievalData
from finetune.evaluation import EmbeddingLookup, build_evaluator, evaluate


@dataclass
class Candidate:
    """A projection from alignment and the setting that made it (``{"ridge": r}``, or the alignment loss)."""

    setting: dict
    projection: Projection


@dataclass
class GridPoint:
    """A candidate at one mix weight, scored on an experiment's labelled queries."""

    ndcg: float
    choice: dict
    projection: Projection


@dataclass
class Cell:
    """A method fitted on one experiment: its projection, how its settings were chosen, and its
    validation NDCG@10 (None without validation queries) and test metrics."""

    method: str
    projection: Projection
    info: dict
    val: float | None
    test: dict

    def rank(self) -> float:
        """What the exported method is chosen by: validation NDCG@10 (a cell without validation ranks last)."""
        return -1.0 if self.val is None else self.val


class Cells:
    """Fits and scores projections for any experiment, memoising what needs no labels.

    Args:
        recipe: The validated recipe.
        data: Its data.
        small, large: The document model's and the query model's embeddings.
        query_texts: The distinct query texts (the rows of ``small.queries`` and ``large.queries``).
        device: Where projections train.
        init: ``projection.init``, where label training starts (else a fresh projection).
    """

    def __init__(
        self,
        recipe: CrossAdapterRecipe,
        data: RetrievalData,
        small: Side,
        large: Side,
        query_texts: list[str],
        device: str,
        init: Projection | None = None,
    ):
        self.recipe, self.data, self.small, self.large, self.device, self.init = (
            recipe,
            data,
            small,
            large,
            device,
            init,
        )
        self.query_texts, self.doc_texts = query_texts, [data.corpus[d] for d in data.corpus]
        self.row_of_text = {t: i for i, t in enumerate(query_texts)}
        self.row_of_doc = {d: i for i, d in enumerate(data.corpus)}
        self.both = recipe.projection.input == "both"
        # what a projection reads per query: [q_large ; q_small] for input both, q_large for ERA's input large
        self.inputs = torch.cat([large.queries, small.queries], 1) if self.both else large.queries
        self.aligned: dict[tuple, list[Candidate]] = {}  # cleared when the alignment texts change
        self._zero_shot: dict[tuple, dict] = {}
        self._evaluators: dict[tuple, object] = {}
        # mined negatives: what the existing small-model index ranks highest. Every query gets its own (from
        # its own labels only), since leave-one-domain-out trains on queries of any split. Built here, so a
        # problem with the negatives stops the run before it writes.
        self.sampler, _ = build_sampler(
            data,
            recipe.negatives,
            small.docs.to(device),
            self.row_of_text,
            self.row_of_doc,
            list(data.queries),
            self.lookup(small.queries, small.docs),
            recipe.seed,
        )

    def lookup(self, queries: torch.Tensor, documents: torch.Tensor, projection=None) -> EmbeddingLookup:
        """Cached embeddings as a model for the evaluator; queries go through ``projection`` if given."""
        transform = None if projection is None else (lambda q: projection(q.to(self.device)).cpu())
        return EmbeddingLookup(self.query_texts, queries, self.doc_texts, documents, transform)

    def score(
        self, ids: list[str], queries: torch.Tensor, documents: torch.Tensor, projection=None, *, split: str
    ) -> dict:
        """The shared evaluator's metrics for query ``ids`` against the whole corpus; ``split`` (``val`` for
        choosing, ``test`` for reporting; no default, so no scoring is booked as test by omission) names the
        evaluator, so the run's stage table books the time right."""
        key = (tuple(ids), split)
        if key not in self._evaluators:  # selection scores the same queries for every ridge x mix point
            self._evaluators[key] = build_evaluator(self.data, ids, split)
        return evaluate(
            self._evaluators[key], self.lookup(queries, documents, projection), corpus_embeddings=documents
        )

    def projected(self, ids: list[str], projection: Projection, split: str) -> dict:
        """Metrics of ``projection``'s queries against the small model's (unchanged) document index."""
        return self.score(ids, self.inputs, self.small.docs, projection, split=split)

    def zero_shot(self, ids: list[str]) -> dict[str, dict]:
        """Small model alone, large model alone, and (equal widths only) large queries against small documents,
        on test queries: reported rows."""
        key = tuple(ids)
        if key not in self._zero_shot:
            small, large = self.small, self.large
            rows = {
                "small model alone": self.score(ids, small.queries, small.docs, split="test"),
                "large model alone": self.score(ids, large.queries, large.docs, split="test"),
            }
            if large.width == small.width:
                rows["large queries, small documents"] = self.score(ids, large.queries, small.docs, split="test")
            self._zero_shot[key] = rows
        return self._zero_shot[key]

    def _rows(self, ids) -> list[int]:
        return sorted({self.row_of_text[self.data.queries[q]] for q in ids})

    def align(self, objective: str, unlabelled: list[str]) -> list[Candidate]:
        """Phase 1 over the corpus, the alignment texts and (``use_queries``) the text of ``unlabelled``
        queries: one ``input: large`` projection per candidate setting. Memoised, as it uses no labels."""
        config = self.recipe.alignment
        key = (objective, frozenset(unlabelled) if config.use_queries else frozenset())
        if key not in self.aligned:
            self.aligned[key] = self._aligned(objective, self._rows(key[1]))
        return self.aligned[key]

    def _aligned(self, objective: str, rows: list[int]) -> list[Candidate]:
        config, device = self.recipe.alignment, self.device
        small, large = self.small.aligned_texts().to(device), self.large.aligned_texts().to(device)
        if objective == "scores":
            # the queries weight the score error by the directions queries use; the texts keep every other
            # direction weighted, so a handful of probe queries (one domain's) cannot leave the map blind
            probes = torch.cat([self.large.queries[rows].to(device), large]) if rows else None
            out = []
            for ridge in sorted(config.ridge, reverse=True):  # select() keeps the first of equals: more ridge
                projection = self.fresh_projection("large")
                projection.set_map(score_map(small, large, ridge, probes))
                out.append(Candidate({"ridge": ridge}, projection))
            return out
        source = torch.cat([large, self.large.queries[rows].to(device)])
        target = torch.cat([small, self.small.queries[rows].to(device)])
        projection = self.fresh_projection("large")
        history = align_projection(projection, source, target, config, self.recipe.seed)
        loss = {"before": history[0]["loss"], "after": history[-1]["loss"], "epochs": len(history) - 1}
        return [Candidate({"alignment_loss": loss}, projection)]

    def select(self, candidates: list[Candidate], experiment: Experiment) -> tuple[Projection, dict]:
        """The candidate (and, for ``input: both``, the mix weight) with the best NDCG@10 on the experiment's
        labelled queries. Alignment fitted no label, so its train queries are held out for it too; ties go
        to the larger ridge and the smaller mix (the one closer to the small model)."""
        ids = experiment.train + experiment.val
        probes = self.large.queries[self._rows(experiment.unlabelled or ids)].to(self.device)
        grid = []
        for candidate in candidates:
            for mix in self.recipe.alignment.mix if self.both else [None]:
                p = candidate.projection if mix is None else candidate.projection.mixed(mix, probes)
                choice = {**candidate.setting, **({} if mix is None else {"mix": mix})}
                grid.append(GridPoint(self.projected(ids, p, "val")["ndcg@10"], choice, p))
        best = max(grid, key=lambda g: g.ndcg)  # max keeps the first of equals: the smallest mix
        chosen = {**best.choice, "selection_ndcg@10": best.ndcg, "selection_queries": len(ids)}
        chosen["grid"] = [{**g.choice, "ndcg@10": g.ndcg} for g in grid]
        return best.projection, chosen

    def fresh_projection(self, input: str | None = None) -> Projection:
        torch.manual_seed(self.recipe.seed)  # every cell starts from the same initialisation
        p = self.recipe.projection
        return Projection(self.large.width, self.small.width, p.type, p.hidden_dim, input or p.input).to(self.device)

    def fit(self, mode: str, objective: str | None, experiment: Experiment) -> tuple[Projection, dict]:
        """A projection fitted by ``mode`` (and alignment ``objective``) on ``experiment``'s queries."""
        info = {}
        if mode in ("alignment_only", "both"):
            projection, info["alignment"] = self.select(self.align(objective, experiment.unlabelled), experiment)
            projection = copy.deepcopy(projection)
        elif self.init is not None:
            projection = copy.deepcopy(self.init).to(self.device)
        else:  # input both: f starts at zero, so epoch 0 is the small model alone
            projection = self.fresh_projection()
        if mode in ("label_only", "both") and self.both and not experiment.val:
            # nothing to choose an epoch on: the starting point (the small model, or the alignment's choice) stays
            info["label_training"] = "skipped: no validation queries to keep a better epoch on"
        elif mode in ("label_only", "both"):
            info["history"] = self._label_training(projection, experiment)
        projection.eval()
        return projection, info

    def _label_training(self, projection: Projection, experiment: Experiment) -> list[dict]:
        """Phase 2: the adapter's loop on the experiment's train queries, keeping the best validation epoch."""
        validate = None
        if experiment.val:
            val = build_evaluator(self.data, experiment.val, "val")

            def validate(p):
                lookup = self.lookup(self.inputs, self.small.docs, p)
                return evaluate(val, lookup, corpus_embeddings=self.small.docs)["ndcg@10"]

        pairs = relevant_pairs(self.data, experiment.train, self.row_of_text, self.row_of_doc)
        r = self.recipe
        documents = self.small.docs.to(self.device)
        return train_adapter(
            projection, self.inputs.to(self.device), documents, pairs, self.sampler, r.loss, r.train, r.seed, validate
        )
