"""Recipe schema for the frozen-encoder query adapter (``kind: adapter``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune.config import CacheConfig, RecipeBase, Section


class AdapterConfig(Section):
    """The layer applied to query embeddings.

    ``linear`` is a d×d matrix plus bias, identity-initialised. ``mlp`` is residual,
    ``q + W2·relu(W1·q)`` with ``W2`` zero-initialised; both equal the base model at step 0.
    """

    type: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(2048, gt=0, description="mlp hidden width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="mlp dropout")


class NegativesConfig(Section):
    """Where negatives come from.

    ``random`` draws documents that are not relevant to the query, from the corpus
    (``pool: corpus``) or from an unrelated text file (``pool: file``, one text per line, or JSONL
    with a ``text`` field). ``given`` uses the data's own negative column. ``topk`` draws from the
    ``top_k`` non-relevant documents the frozen document index ranks highest for the query.
    """

    strategy: Literal["random", "given", "topk"] = "random"
    pool: Literal["corpus", "file"] = "corpus"
    file: str | None = None
    per_query: int = Field(1, gt=0, description="negatives per query (mnrl adds in-batch ones)")
    top_k: int = Field(20, gt=0, description="topk: how many of the highest-ranked non-relevant documents to draw from")

    @model_validator(mode="after")
    def _file_for_file_pool(self):
        if self.pool == "file" and not self.file:
            raise ValueError("negatives.pool 'file' needs negatives.file: a text or JSONL file of unrelated texts")
        return self


class LossConfig(Section):
    """``triplet``: margin loss on L2 distance (p=2). ``mnrl``: InfoNCE over in-batch and random negatives."""

    type: Literal["triplet", "mnrl"] = "mnrl"
    margin: float = Field(0.2, gt=0.0)
    temperature: float = Field(0.05, gt=0.0)
    negatives: NegativesConfig = NegativesConfig()


class AdapterTrainConfig(Section):
    """Optimisation: AdamW with linear warmup then linear decay, gradient clipping, early stopping on validation NDCG@10."""

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    patience: int | None = Field(5, gt=0, description="epochs without validation gain before stopping; null = never")


class AdapterRecipe(RecipeBase):
    """A query adapter trained over cached embeddings of a frozen encoder.

    Example:
        >>> from finetune.recipe import load_recipe
        >>> recipe = load_recipe("recipes/adapter.yaml", ["adapter.type=mlp"])
        >>> recipe.adapter.type
        'mlp'
    """

    kind: Literal["adapter"] = "adapter"
    name: str = "adapter"
    adapter: AdapterConfig = AdapterConfig()
    loss: LossConfig = LossConfig()
    train: AdapterTrainConfig = AdapterTrainConfig()
    cache: CacheConfig = CacheConfig()
