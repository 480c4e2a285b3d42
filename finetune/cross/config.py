"""Recipe schema for the cross-model query adapter (``kind: cross_adapter``, the ERA method).

A large ``query_model`` encodes queries; a learned projection maps them into the space of a small
``document_model`` whose document index never changes. Training has two phases, picked by
``mode``: identical-text alignment (no labels) and label training (InfoNCE), or both in turn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from finetune.adapter.config import AdapterTrainConfig, LossConfig
from finetune.config import CacheConfig, ModelConfig, NegativesConfig, RecipeCore, Section

Mode = Literal["alignment_only", "label_only", "both"]
MODES: tuple[str, ...] = ("alignment_only", "label_only", "both")


class ProjectionConfig(Section):
    """The map from the query model's space (d_q) to the document model's (d_d); output L2-normalised.

    ``linear`` is one d_q×d_d matrix plus bias; ``mlp`` is Linear → ReLU → Linear with ``hidden_dim``.
    """

    type: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(1024, gt=0)


class AlignmentConfig(Section):
    """Phase 1: the same texts embedded by both models; the projected query-model embedding is trained
    to match the document model's. Uses corpus documents and the text of non-test queries, never a
    relevance label."""

    loss: Literal["cosine", "mse"] = "cosine"
    use_queries: bool = Field(
        True, description="add the text of train and val queries (unlabelled) to the corpus documents"
    )
    epochs: int = Field(40, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)


class DomainsConfig(Section):
    """Domain experiments, for data with a domain column (the FAQ's ``category``)."""

    leave_one_domain_out: bool = Field(False, description="train on all other domains, test on each held-out one")
    per_domain: bool = Field(
        False, description="train one adapter per domain; test in-domain and on the other domains"
    )
    min_queries: int = Field(8, gt=1, description="domains with fewer queries are skipped")
    test_fraction: float = Field(
        0.3, gt=0.0, lt=1.0, description="per_domain: share of a domain's queries held out for its test"
    )


class CrossAdapterRecipe(RecipeCore):
    """A projection from a large query encoder into a small encoder's document space.

    Example:
        >>> from finetune.recipe import load_recipe
        >>> recipe = load_recipe("recipes/cross_adapter.yaml", ["mode=label_only"])
        >>> recipe.modes()
        ['label_only']
    """

    kind: Literal["cross_adapter"] = "cross_adapter"
    name: str = "cross-adapter"
    query_model: ModelConfig = ModelConfig(name="sentence-transformers/all-mpnet-base-v2")
    document_model: ModelConfig = ModelConfig()
    projection: ProjectionConfig = ProjectionConfig()
    mode: Mode | list[Mode] = Field("both", description="one mode, or a list to run each (the first is exported)")
    train_ratios: list[float] = Field(
        [1.0], description="fractions of the labelled train (and val) queries; each runs on the same test split"
    )
    alignment: AlignmentConfig = AlignmentConfig()
    loss: LossConfig = LossConfig()
    negatives: NegativesConfig = NegativesConfig()
    train: AdapterTrainConfig = AdapterTrainConfig(lr=1e-3)
    domains: DomainsConfig = DomainsConfig()
    cache: CacheConfig = CacheConfig()

    @field_validator("train_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < r <= 1.0 for r in value):
            raise ValueError(f"every train ratio must be in (0, 1], got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _local_models(self):
        if self.query_model.provider != "local" or self.document_model.provider != "local":
            raise ValueError(
                "cross_adapter exports a local Router model and needs local encoders; for an API model use kind: "
                "adapter"
            )
        return self

    @model_validator(mode="after")
    def _modes_unique(self):
        if isinstance(self.mode, list) and (not self.mode or len(set(self.mode)) != len(self.mode)):
            raise ValueError(f"mode: list each of {', '.join(MODES)} at most once")
        return self

    def modes(self) -> list[str]:
        """The modes to run, in order; the first one's projection (at the largest ratio) is exported."""
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)
