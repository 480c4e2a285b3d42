"""Recipe schema for a second-stage reranker (``kind: reranker``): a cross-encoder fine-tuned from the user's
checkpoint (full, 16-bit LoRA or 4-bit QLoRA) to reorder the retriever's top k."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from finetune.config import ModelConfig, NegativesConfig, RecipeCore, Section
from finetune.qlora.config import LoraAdapters, TrainerArguments

DEPTH = 100
"""How deep the retriever's ranking is read for every query: the evaluator's MAP@100 reads that far, and no
``rerank.k`` may reach past it."""


class RerankSection(Section):
    """How many of the retriever's top documents the reranker reorders.

    ``k: auto`` takes, from ``grid``, the k with the best validation NDCG@10 (the smallest on a tie: it is the
    cheapest); k = 0 is the retriever alone, so a reranker that does not help is not used. The documents past
    k keep the retriever's order.
    """

    k: Literal["auto"] | Annotated[int, Field(ge=0, le=DEPTH)] = Field(
        "auto", description="documents reranked per query; auto: chosen on validation from grid (0: no reranking)"
    )
    grid: list[Annotated[int, Field(ge=0, le=DEPTH)]] = Field(
        [0, 5, 10, 20, 50], description="auto: the values of k to choose from (0 is always among them)"
    )

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: list[int]) -> list[int]:
        return sorted(set(value) | {0})


class RerankerTrainConfig(TrainerArguments):
    """``CrossEncoderTrainingArguments`` the recipe sets. A batch is ``batch_size`` (query, document) pairs."""

    batch_size: int = Field(32, gt=0, description="(query, document) pairs per step")
    lr: float = Field(2e-5, gt=0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.01, ge=0)


class RerankerRecipe(RecipeCore):
    """Fine-tune a cross-encoder on (query, document, relevant?) pairs and score it as a second stage.

    ``model`` is the reranker's starting checkpoint: a cross-encoder, a BERT-class encoder (it gets a new
    one-logit head, and the run says so) or a decoder LLM (scored by its yes/no logits, as
    sentence-transformers loads a ``*ForCausalLM``). ``retriever`` is the first stage (a
    ``SentenceTransformer`` checkpoint, or a qlora run's ``model/``): it mines the training negatives, and its
    top ``rerank.k`` are reordered. ``base`` is the retriever alone; ``tuned`` the retriever with the
    exported reranker over its top k.

    Example (not run: it needs a model, data or a server)::
        recipe = load_recipe("recipes/reranker.yaml", ["method=lora", "quantization=nf4"])
    """

    kind: Literal["reranker"] = "reranker"
    name: str = "reranker"
    model: ModelConfig = ModelConfig()
    retriever: ModelConfig = Field(
        description="the first-stage encoder whose top k the reranker reorders, e.g. retriever: "
        "sentence-transformers/all-MiniLM-L6-v2 or a qlora run's model/ folder"
    )
    method: Literal["full", "lora"] = "full"
    quantization: Literal["none", "nf4"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: LoraAdapters = LoraAdapters()
    negatives: NegativesConfig = NegativesConfig(strategy="mined", per_query=5)
    rerank: RerankSection = RerankSection()
    train: RerankerTrainConfig = RerankerTrainConfig()

    @model_validator(mode="after")
    def _combinations(self):
        if self.quantization == "nf4" and self.method != "lora":
            raise ValueError("quantization nf4 trains LoRA on a 4-bit base; set method=lora (or quantization=none)")
        for section in ("model", "retriever"):
            if getattr(self, section).provider != "local":
                raise ValueError(
                    f"{section}.provider: a reranker recipe loads both models' weights; use a local checkpoint"
                )
        if self.negatives.strategy == "none":
            raise ValueError(
                "negatives.strategy none leaves the reranker only relevant pairs to learn from; use mined (the "
                "retriever's top documents), bm25, random or given"
            )
        return self
