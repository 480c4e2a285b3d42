"""Recipe schema for encoder fine-tuning (``kind: qlora``): 4-bit NF4 + LoRA, 16-bit LoRA, or full."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from finetune.config import ExportConfig, ModelConfig, NegativesConfig, RecipeBase, Section
from finetune.matryoshka import check_matryoshka_dims


class LoraAdapters(Section):
    """peft ``LoraConfig`` settings, shared by every kind that trains LoRA adapters.

    ``target_modules: auto`` picks the attention and MLP projections per architecture (BERT:
    query, key, value, dense; MPNet: q, k, v, o; ModernBERT: Wqkv, Wo, Wi; Qwen/Gemma/Llama/
    Mistral: q/k/v/o_proj, gate/up/down_proj) and every linear layer but heads for any other
    (see :mod:`finetune.lora_targets`); a list names layers (``[q_proj, v_proj]``) or full paths.
    """

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["auto"] | list[str] = "auto"
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"

    def peft_config(self, targets: list[str], **extra):
        """peft's ``LoraConfig`` of these settings over ``targets`` (``extra``: the task type, modules to save)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.use_rslora,
            bias=self.bias,
            **extra,
        )


class LoraSection(LoraAdapters):
    """The encoder's LoRA settings; ``train_head`` also trains, in full, the checkpoint's modules after
    pooling (Dense layers)."""

    train_head: bool = Field(
        False, description="also train the Dense/other modules after the transformer (frozen by default)"
    )


class EncoderLossConfig(Section):
    """The training loss: ``MultipleNegativesRankingLoss``, optionally cached and/or Matryoshka.

    ``cached: true`` uses ``CachedMultipleNegativesRankingLoss`` (GradCache): the logical batch
    ``train.batch_size`` (every other text in it is a negative) is embedded without gradients,
    then back-propagated ``mini_batch_size`` texts at a time, so memory follows the mini-batch
    and the result is the plain loss's. ``mini_batch_size: auto`` takes the largest that the
    memory planner (:mod:`finetune.memory`) fits in the device's free memory.

    ``matryoshka_dims`` wraps the loss in ``MatryoshkaLoss``: the loss is also taken on the
    embedding truncated to each size, so a truncated index keeps working; the run then reports
    NDCG@10 at each size for the base and the tuned model.
    """

    cached: bool = False
    mini_batch_size: int | Literal["auto"] | None = Field(
        None,
        description="cached: texts per forward/backward pass (memory), or auto (the planner's); default 32, or "
        "train.batch_size if smaller",
    )
    matryoshka_dims: list[int] | None = Field(
        None, description="e.g. [384, 256, 128, 64]: decreasing sizes, the first at most the model's dimension"
    )

    @field_validator("mini_batch_size")
    @classmethod
    def _positive(cls, value):
        if value not in (None, "auto") and value < 1:
            raise ValueError(f"mini_batch_size must be a positive number or auto, got {value}")
        return value

    @field_validator("matryoshka_dims")
    @classmethod
    def _decreasing(cls, value):
        return check_matryoshka_dims(value)


class TeacherConfig(Section):
    """A teacher whose scores the encoder learns from (knowledge distillation), beside or instead of the labels.

    ``model`` is a bi-encoder (any ``SentenceTransformer`` checkpoint, or a finished qlora run's ``model/``) or a
    cross-encoder (a finished reranker run's ``model/``, or any ``CrossEncoder`` folder); the run folder itself
    also works. Its scores of each training row's positive and mined negatives are computed once, before
    training, and cached. ``loss: kl_div`` (``DistillKLDivLoss``) matches the student's softmax over
    (positive, negatives) to the teacher's; ``margin_mse`` (``MarginMSELoss``) matches the positive-minus-negative
    margins; ``in_batch_kl`` (a bi-encoder teacher only) matches the softmax over every document in the batch,
    MNRL's candidates, to the teacher's, from its cached embeddings. ``mnrl_weight`` adds
    MultipleNegativesRankingLoss on the same batch at that weight (choose it on validation:
    ``python -m finetune sweep recipes/qlora.yaml teacher.mnrl_weight=0,0.5,1``).
    """

    model: ModelConfig
    loss: Literal["kl_div", "margin_mse", "in_batch_kl"] = "kl_div"
    temperature: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        "auto",
        description="kl_div, in_batch_kl: the teacher's softmax temperature; auto: 0.05 for a bi-encoder's cosine "
        "scores (the student's own, MNRL's scale 20), 1 for a cross-encoder's logits",
    )
    mnrl_weight: float = Field(0.0, ge=0.0, description="MultipleNegativesRankingLoss added at this weight")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"model": value} if isinstance(value, str) else value


def mini_batch_of(recipe) -> int | None:
    """The cached loss's mini-batch as set (``auto`` excepted): 32 or the batch, whichever is smaller, by default."""
    if not recipe.loss.cached or recipe.loss.mini_batch_size == "auto":
        return None
    return recipe.loss.mini_batch_size or min(32, recipe.train.batch_size)


def resolved_optimizer(train, cuda: bool) -> str:
    """``train.optimizer``, ``auto`` resolved: 8-bit AdamW on CUDA, torch AdamW elsewhere."""
    return train.optimizer if train.optimizer != "auto" else ("adamw_8bit" if cuda else "adamw_torch")


def resolved_precision(train, cuda: bool, bf16_supported: bool = True) -> str:
    """``train.precision``, ``auto`` resolved: bf16 on CUDA (fp16 where the GPU lacks bf16), fp32 elsewhere."""
    if train.precision != "auto":
        return train.precision
    return ("bf16" if bf16_supported else "fp16") if cuda else "fp32"


class TrainerArguments(Section):
    """The transformers ``TrainingArguments`` every trainer-based kind sets (qlora, reranker)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(
        -1,
        description="stop after at most N optimizer steps (or at the end of the epochs, if sooner); -1 = the epochs",
    )
    batch_size: int = Field(32, gt=1, description="MNRL uses the rest of the batch as negatives")
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)


class QLoRATrainConfig(TrainerArguments):
    """``SentenceTransformerTrainingArguments`` the recipe sets (defaults as in the seed notebook)."""

    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = "auto"
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="keep only each layer's input, recompute the rest in backward: less memory, about one more "
        "forward pass per step (x1.2 to x1.6 measured on a CPU); auto: on when the memory plan's peak does not "
        "fit 90% of the free GPU memory (on a CPU: what the run adds passes a quarter of the machine's RAM, or 90% "
        "of the available RAM if less), and the run says which",
    )
    eval_steps: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        "auto",
        description="evaluate and save every N steps; auto: once an epoch (or once, at the end, when "
        "train.max_steps stops training sooner), so the schedule follows the data's size",
    )
    val_documents: Literal["all"] | Annotated[int, Field(gt=0)] = Field(
        20000,
        description="validation while training scores against at most N documents, fixed once from the base "
        "model: every validation positive, each validation query's top documents, and a seeded random sample "
        "(finetune.candidates); a corpus this size or smaller is used whole; all: always the whole corpus. "
        "The test split is always scored against the whole corpus",
    )
    save_total_limit: int = Field(2, gt=0)
    load_best_model_at_end: bool = True


class QLoRARecipe(RecipeBase):
    """Fine-tune the encoder itself with MultipleNegativesRankingLoss and the no-duplicates sampler.

    ``method: lora`` trains LoRA adapters (on a 4-bit base when ``quantization: nf4``: QLoRA);
    ``method: full`` trains every weight, unquantised, as the quality and cost reference.

    Example (not run: it needs a model, data or a server)::
        recipe = load_recipe("recipes/qlora.yaml", ["method=full", "quantization=none"])
    """

    kind: Literal["qlora"] = "qlora"
    name: str = "qlora"
    backend: Literal["auto", "peft", "unsloth"] = "auto"
    method: Literal["lora", "full"] = "lora"
    quantization: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    pooling: Literal["auto", "cls", "mean", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"] = Field(
        "auto", description="auto: the checkpoint's own pooling; another value replaces it (the run says so)"
    )
    lora: LoraSection = LoraSection()
    loss: EncoderLossConfig = EncoderLossConfig()
    negatives: NegativesConfig = NegativesConfig(strategy="none")
    train: QLoRATrainConfig = QLoRATrainConfig()
    export: ExportConfig = ExportConfig()
    teacher: TeacherConfig | None = Field(
        None, description="distil a teacher's scores into the encoder (a bi-encoder, or a reranker run's model/)"
    )

    @model_validator(mode="after")
    def _teacher(self):
        if self.teacher is None:
            return self
        if self.negatives.strategy == "none":
            raise ValueError(
                "teacher: the student learns the teacher's scores over each row's positive and negatives, and "
                "negatives.strategy is none; set negatives.strategy=mined"
            )
        if self.loss.cached or self.loss.matryoshka_dims:
            raise ValueError("teacher: distillation takes the plain loss; remove loss.cached and loss.matryoshka_dims")
        if self.teacher.model.provider != "local":
            raise ValueError("teacher.model.provider: the teacher scores on this machine; use a local checkpoint")
        return self

    @model_validator(mode="after")
    def _combinations(self):
        if self.method == "full" and self.quantization != "none":
            raise ValueError(
                "method 'full' trains unquantised weights; set quantization=none (or method=lora for QLoRA)"
            )
        if self.method == "full" and self.backend == "unsloth":
            raise ValueError("backend 'unsloth' is for LoRA; use backend=peft or auto with method=full")
        if self.model.provider != "local":
            raise ValueError(
                "model.provider: the QLoRA recipe trains the encoder's weights, which an API model does not expose; "
                "use kind: adapter"
            )
        if self.merge.scale != 1.0 and self.method == "lora" and self.lora.train_head:
            raise ValueError(
                "merge.scale scales the LoRA delta, and a fully trained head has no delta; set lora.train_head: "
                "false or merge.scale: 1"
            )
        mini = self.loss.mini_batch_size
        if self.loss.cached and mini not in (None, "auto") and mini > self.train.batch_size:
            raise ValueError(
                f"loss.mini_batch_size {self.loss.mini_batch_size} is larger than train.batch_size "
                f"{self.train.batch_size}; the mini-batch is a slice of the batch: lower it, or raise train.batch_size"
            )
        return self
