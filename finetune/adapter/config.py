"""Recipe schema for the frozen-encoder query adapter (``kind: adapter``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from finetune.config import CacheConfig, NegativesConfig, RecipeBase, Section
from finetune.matryoshka import check_matryoshka_dims


class AdapterConfig(Section):
    """The layer applied to query embeddings.

    ``linear`` is a d×d matrix plus bias, identity-initialised. ``mlp`` is residual,
    ``q + W2·relu(W1·q)`` with ``W2`` zero-initialised; both equal the base model at step 0.
    """

    type: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(2048, gt=0, description="mlp hidden width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="mlp dropout")


class LossConfig(Section):
    """``triplet``: margin loss on L2 distance (p=2). ``mnrl``: InfoNCE over in-batch negatives and the recipe's
    ``negatives``.
    """

    type: Literal["triplet", "mnrl"] = "mnrl"
    margin: float = Field(0.2, gt=0.0)
    temperature: float = Field(0.05, gt=0.0)
    matryoshka_dims: list[int] | None = Field(
        None, description="mnrl: also take the loss on query and document embeddings truncated to each size"
    )

    @field_validator("matryoshka_dims")
    @classmethod
    def _decreasing(cls, value):
        return check_matryoshka_dims(value)


class AdapterTrainConfig(Section):
    """Optimisation: AdamW with linear warmup then linear decay, gradient clipping, early stopping on validation
    NDCG@10.
    """

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    patience: int | None = Field(5, gt=0, description="epochs without validation gain before stopping; null = never")
    save_every: int = Field(1, gt=0, description="save a resumable checkpoint every N epochs")


class AdapterRecipe(RecipeBase):
    """A query adapter trained over cached embeddings of a frozen encoder.

    Example:
        >>> from finetune.recipe import load_recipe
        >>> recipe = load_recipe("recipes/adapter.yaml", ["adapter.type=mlp"])
        >>> recipe.adapter.type
        'mlp'
    """

    kind: Literal["adapter"] = "adapter"
    # fields of other kinds that cannot act here, and why (the unknown-field error says it)
    unavailable: ClassVar[dict[str, str]] = {
        "export": "ONNX export takes one encoder stack, and this kind's model/ sends queries and documents through "
        "different modules (a Router)",
        "teacher": "the adapter trains a layer on cached embeddings of a frozen encoder; distil a teacher into the "
        "encoder with kind: qlora",
    }
    name: str = "adapter"
    adapter: AdapterConfig = AdapterConfig()
    loss: LossConfig = LossConfig()
    negatives: NegativesConfig = NegativesConfig()
    train: AdapterTrainConfig = AdapterTrainConfig()
    cache: CacheConfig = CacheConfig()

    @model_validator(mode="after")
    def _triplet_needs_negatives(self):
        if self.loss.type == "triplet" and self.negatives.strategy == "none":
            raise ValueError(
                "loss.type 'triplet' needs negatives; set negatives.strategy (random, mined, bm25, given) or "
                "loss.type=mnrl"
            )
        return self
