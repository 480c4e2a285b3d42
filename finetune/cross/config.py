"""Recipe schema for the cross-model query adapter (``kind: cross_adapter``, the ERA method).

A large ``query_model`` encodes queries; a learned projection maps them into the space of a small
``document_model`` whose document index never changes. Training has two phases, picked by
``mode``: alignment (no labels; ``objective: scores`` matches the large model's query-document
scores over the corpus in closed form, ``identical_text`` is ERA's text-to-text alignment) and label
training (InfoNCE), or both in turn. With ``projection.input: both`` the query is the small model's
own embedding plus a projected large-model one, mixed at a weight chosen on validation, so the small
model alone is always a candidate.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from finetune.adapter.config import AdapterTrainConfig, LossConfig
from finetune.config import CacheConfig, ModelConfig, NegativesConfig, RecipeCore, Section

Mode = Literal["alignment_only", "label_only", "both"]
MODES: tuple[str, ...] = ("alignment_only", "label_only", "both")
Objective = Literal["scores", "identical_text"]


class ProjectionConfig(Section):
    """The map from the query model's space (d_q) to the document model's (d_d); output L2-normalised.

    ``linear`` is one d_q×d_d matrix plus bias; ``mlp`` is Linear → ReLU → Linear with ``hidden_dim``.
    """

    type: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(1024, gt=0)
    input: Literal["both", "large"] = Field(
        "both",
        description="both: normalize(w q_small + f(q_large)), starting at the small model; large: ERA's "
        "normalize(f(q_large))",
    )
    init: str | None = Field(
        None, description="label_only: start from a saved projection/ folder (e.g. another run's) instead of zero"
    )


class AlignmentConfig(Section):
    """Phase 1, without relevance labels: fit the projection from texts both models embed.

    ``scores`` (default) solves for the linear map ``W`` under which the small index scores every
    document as the large model would (closed form, ``ridge`` chosen on validation); ``identical_text``
    (ERA) trains the projection so the large model's embedding of a text lands on the small model's
    embedding of the same text. The corpus, the ``texts`` file and (``use_queries``) the text of
    non-test queries are used; never a label, and never a test query's text.
    """

    objective: Objective | list[Objective] = Field("scores", description="one objective, or a list to run each")
    ridge: list[float] = Field(
        [1e-4, 1e-3, 1e-2, 1e-1],
        description="scores: the regularisation grid; the value is chosen on validation (ties: the larger)",
    )
    mix: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        description="projection.input both: weights of the projected large query to choose from on validation "
        "(0 is the small model alone)",
    )
    texts: str | None = Field(
        None, description="more unlabelled text: a .txt/.md file, a folder of them, or a .jsonl of {text}"
    )
    use_queries: bool = Field(
        True,
        description="use the text of train and val queries (unlabelled): as probes weighting the score error "
        "(scores), as extra aligned texts (identical_text)",
    )
    loss: Literal["cosine", "mse"] = "cosine"
    epochs: int = Field(40, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)

    @field_validator("ridge")
    @classmethod
    def _ridge(cls, value: list[float]) -> list[float]:
        if not value or any(r <= 0 for r in value):
            raise ValueError(f"list one or more ridge values > 0, got {value}")
        return sorted(set(value))

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= m <= 1.0 for m in value):
            raise ValueError(f"list one or more mix weights in [0, 1], got {value}")
        return sorted(set(value))

    def objectives(self) -> list[str]:
        """The objectives to run, in order."""
        return [self.objective] if isinstance(self.objective, str) else list(self.objective)


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
        >>> overrides = ["alignment.objective=scores", "mode=[both,label_only]"]
        >>> recipe = load_recipe("recipes/cross_adapter.yaml", overrides)
        >>> recipe.methods(), recipe.method_name("both", "scores")
        ([('both', 'scores'), ('label_only', None)], 'both')
    """

    kind: Literal["cross_adapter"] = "cross_adapter"
    # fields of other kinds that cannot act here, and why (the unknown-field error says it)
    unavailable: ClassVar[dict[str, str]] = {
        "export": "ONNX export takes one encoder stack, and this kind's model/ sends queries and documents through "
        "different modules (a Router)",
        "teacher": "the cross_adapter trains a projection on cached embeddings of frozen encoders; distil a teacher "
        "into the encoder with kind: qlora",
    }
    name: str = "cross-adapter"
    query_model: ModelConfig = ModelConfig(name="sentence-transformers/all-mpnet-base-v2")
    document_model: ModelConfig = ModelConfig()
    projection: ProjectionConfig = ProjectionConfig()
    mode: Mode | list[Mode] = Field(
        "both",
        description="one mode, or a list to run each; the method with the best validation NDCG@10 is exported",
    )
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
    def _closed_form_is_linear(self):
        if "scores" in self.alignment.objectives() and self.projection.type != "linear" and self.aligns():
            raise ValueError(
                "alignment.objective scores is a closed-form linear map; set projection.type: linear, or "
                "alignment.objective: identical_text for an mlp"
            )
        return self

    @model_validator(mode="after")
    def _objectives_unique(self):
        objectives = self.alignment.objectives()
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError("alignment.objective: list each of scores, identical_text at most once")
        return self

    def aligns(self) -> bool:
        return bool(set(self.modes()) & {"alignment_only", "both"})

    def local_models(self) -> bool:
        """Both encoders are local, so the run can export one ``SentenceTransformer`` folder."""
        return self.query_model.provider == "local" and self.document_model.provider == "local"

    @model_validator(mode="after")
    def _modes_unique(self):
        if isinstance(self.mode, list) and (not self.mode or len(set(self.mode)) != len(self.mode)):
            raise ValueError(f"mode: list each of {', '.join(MODES)} at most once")
        return self

    def modes(self) -> list[str]:
        """The modes to run, in order."""
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    def methods(self) -> list[tuple[str, str | None]]:
        """``(mode, objective)`` pairs to run: each aligning mode with each objective, ``label_only`` once."""
        objectives = self.alignment.objectives()
        return [
            pair for m in self.modes() for pair in ([(m, None)] if m == "label_only" else [(m, o) for o in objectives])
        ]

    def method_name(self, mode: str, objective: str | None) -> str:
        """The row label: the mode, with its objective when the recipe runs more than one."""
        return mode if objective is None or len(self.alignment.objectives()) == 1 else f"{mode} ({objective})"
