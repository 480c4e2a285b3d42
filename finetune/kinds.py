"""The one registry of recipe kinds: schema, runner, rules and capabilities of each.

A kind is a schema (a pydantic recipe class, validated by :mod:`finetune.recipe`), a runner
(imported only when a run of that kind starts, so reading a recipe never imports torch-heavy
code), its field rules (:mod:`finetune.field_rules`) and what it can do (:class:`RecipeKind`'s
capabilities, which ``run``, ``sweep`` and the CLI ask instead of comparing kind names). The
runner keeps the three-phase contract of :mod:`finetune.contract`.

Adding a kind: its schema (a :class:`~finetune.config.RecipeCore` subclass with
``kind: Literal["name"]``), its runner, its rules, and one entry in :data:`KINDS` (see
``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from finetune.adapter.config import AdapterRecipe
from finetune.contract import Runner
from finetune.cross.config import CrossAdapterRecipe
from finetune.errors import FinetuneError
from finetune.qlora.config import QLoRARecipe
from finetune.reranker.config import RerankerRecipe


@dataclass(frozen=True)
class RecipeKind:
    """A recipe kind: its schema, its runner and rules (``"module:name"``, imported when needed), and
    what it can do.

    Args:
        name: The ``kind:`` value.
        schema: The pydantic recipe class.
        runner: ``"module:Class"`` of its :class:`Runner`.
        rules: The module of its field rules: ``RULES`` (a tuple of :class:`finetune.field_rules.Rule`) and
            ``ALWAYS`` (the fields that always act); :mod:`finetune.field_rules` checks every recipe with them.
        caches_embeddings: Frozen-encoder kinds encode once and reuse; a trained encoder cannot.
        resumable: ``--resume`` continues a killed run (else refused before anything is written).
        sweepable: ``python -m finetune sweep`` takes its recipes (``not_sweepable``: why not, with the fix).
        stops_behind: A sweep point can stop when its validation curve trails the leader's.
        reuses_training: A sweep's final run adopts the chosen point's training (``Start.adopt``).
        checkpoints: ``"module:function"`` giving a run directory's newest complete checkpoint (or None).
        plans_memory: ``"module:function"`` giving ``python -m finetune plan``'s table (None: no encoder trains).
        preloads: ``"module:function"`` run on the recipe before anything imports transformers (a backend
            such as unsloth that patches it at import).
    """

    name: str
    schema: type[BaseModel]
    runner: str
    rules: str
    caches_embeddings: bool
    resumable: bool = True
    sweepable: bool = True
    not_sweepable: str = ""
    stops_behind: bool = False
    reuses_training: bool = False
    checkpoints: str | None = None
    plans_memory: str | None = None
    preloads: str | None = None

    def runner_class(self) -> type[Runner]:
        return _imported(self.runner)

    def field_rules(self) -> tuple:
        """When each of this kind's fields has an effect (see :mod:`finetune.field_rules`)."""
        return importlib.import_module(self.rules).RULES

    def always_fields(self) -> frozenset[str]:
        """This kind's fields that act in every recipe, so no rule guards them."""
        return importlib.import_module(self.rules).ALWAYS

    def refuse_resume(self) -> None:
        """One line, before anything is written, when this kind's runs cannot be resumed."""
        if not self.resumable:
            raise FinetuneError(
                f"--resume is not available for {self.name} recipes (its runs are short); start the recipe again",
                where=f"recipe: kind {self.name}",
            )

    def latest_checkpoint(self, run_dir: Path) -> Path | None:
        """The newest complete checkpoint a run of this kind left in ``run_dir`` (None: none, or none kept)."""
        return _imported(self.checkpoints)(run_dir) if self.checkpoints else None

    def preload(self, recipe) -> None:
        """What must be imported before transformers for this recipe (nothing, for most kinds)."""
        if self.preloads:
            _imported(self.preloads)(recipe)

    def memory_plan(self, recipe, gpu_memory: str | None = None, where: str = "recipe") -> str:
        """``python -m finetune plan``'s table for ``recipe``; one line when this kind trains no encoder."""
        if not self.plans_memory:
            raise FinetuneError(
                f"plan predicts encoder training memory, and kind {self.name} trains on cached embeddings; use a "
                "kind: qlora recipe",
                where=where,
            )
        return _imported(self.plans_memory)(recipe, gpu_memory)


def _imported(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


KINDS: dict[str, RecipeKind] = {
    k.name: k
    for k in (
        RecipeKind(
            "adapter",
            AdapterRecipe,
            "finetune.adapter.runner:AdapterRun",
            "finetune.adapter.rules",
            caches_embeddings=True,
        ),
        RecipeKind(
            "qlora",
            QLoRARecipe,
            "finetune.qlora.runner:QLoRARun",
            "finetune.qlora.rules",
            caches_embeddings=False,
            stops_behind=True,
            reuses_training=True,
            checkpoints="finetune.qlora.trainer:run_checkpoint",
            plans_memory="finetune.qlora.plan_command:plan_text",
            preloads="finetune.qlora.backend:preload_unsloth",
        ),
        RecipeKind(
            "cross_adapter",
            CrossAdapterRecipe,
            "finetune.cross.runner:CrossAdapterRun",
            "finetune.cross.rules",
            caches_embeddings=True,
            resumable=False,  # each cell trains in seconds: a stopped run starts again
            sweepable=False,
            not_sweepable="a cross_adapter run already chooses its ridge, mix and epoch on validation; sweep adapter "
            "or qlora recipes",
        ),
        RecipeKind(
            "reranker",
            RerankerRecipe,
            "finetune.reranker.runner:RerankerRun",
            "finetune.reranker.rules",
            caches_embeddings=False,
            resumable=False,  # no checkpoints: the reranker trains for a set number of steps
            sweepable=False,
            not_sweepable="a reranker run chooses its k on validation; sweep its retriever's qlora recipe",
            plans_memory="finetune.reranker.plan:plan_text",
        ),
    )
}
