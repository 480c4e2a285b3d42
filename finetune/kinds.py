"""The one registry of recipe kinds, and the contract every recipe runner keeps.

A kind is a schema (a pydantic recipe class, validated by :mod:`finetune.recipe`) and a runner
(imported only when a run of that kind starts, so reading a recipe never imports torch-heavy
code). :func:`finetune.run.run_recipe` drives every runner the same way:

1. ``Runner(recipe, data, splits, device, cache, echo)`` loads and checks everything (models,
   negatives, the training stack) before the run directory exists, so bad input writes nothing;
2. ``runner.fit(run_dir, resume=False)`` trains, scores base and tuned on the test split,
   writes its outputs into ``run_dir`` and returns the metrics dict (``base`` and ``tuned`` at least).

``run_recipe`` sets ``runner.export = False`` for a sweep point, whose fit() then writes no model.
A runner whose runs cannot be resumed sets ``resumable = False``; ``run_recipe`` refuses
``--resume`` for it with :meth:`RecipeKind.refuse_resume` before anything is written.

Adding a kind: write its schema (a :class:`~finetune.config.RecipeCore` subclass with
``kind: Literal["name"]``), a runner class that keeps the contract, and one line in :data:`KINDS`;
``tests/test_field_rules.py`` then asks where each new field has an effect.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from finetune.adapter.config import AdapterRecipe
from finetune.cross.config import CrossAdapterRecipe
from finetune.errors import FinetuneError
from finetune.qlora.config import QLoRARecipe


class Runner(Protocol):
    """What :func:`finetune.run.run_recipe` needs of a recipe kind's runner."""

    resumable: bool
    export: bool  # False for sweep points: fit() writes no model (run_recipe sets it)

    def __init__(self, recipe, data, splits, device: str, cache, echo=print) -> None: ...

    def fit(self, run_dir: Path, resume: bool = False) -> dict: ...


@dataclass(frozen=True)
class RecipeKind:
    """A recipe kind: its schema, where its runner lives, and whether it caches embeddings."""

    name: str
    schema: type[BaseModel]
    runner: str  # "module:Class", imported by runner_class()
    caches_embeddings: bool  # frozen-encoder kinds encode once and reuse; a trained encoder cannot

    def runner_class(self) -> type[Runner]:
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)

    def refuse_resume(self) -> None:
        """One line, before anything is written, when this kind's runs cannot be resumed."""
        if not self.runner_class().resumable:
            raise FinetuneError(
                f"--resume is not available for {self.name} recipes (its runs are short); start the recipe again",
                where=f"recipe: kind {self.name}",
            )


KINDS: dict[str, RecipeKind] = {
    k.name: k
    for k in (
        RecipeKind("adapter", AdapterRecipe, "finetune.adapter.runner:AdapterRun", caches_embeddings=True),
        RecipeKind("qlora", QLoRARecipe, "finetune.qlora.runner:QLoRARun", caches_embeddings=False),
        RecipeKind(
            "cross_adapter", CrossAdapterRecipe, "finetune.cross.runner:CrossAdapterRun", caches_embeddings=True
        ),
    )
}
