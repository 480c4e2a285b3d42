"""Recipe sections shared by every recipe kind: model, data, splits, cache, output.

Each section is a pydantic model with ``extra="forbid"``, so a misspelt key fails loudly with a
did-you-mean instead of being ignored. Recipe kinds (``adapter``, ``qlora``, ...) compose these
sections with their own training sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_DATASETS = ("construction-faq",)


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which encoder to load and how to encode with it.

    ``provider: local`` (default): ``name`` is a local folder, a Hugging Face Hub id, or a model
    that an installed package carries (see :mod:`finetune.models`). It is used as
    ``SentenceTransformer(name)`` loads it: its own pooling, Dense layers, normalisation and
    prompts (see :mod:`finetune.prompts`); ``query_prompt``/``document_prompt`` replace a prompt.

    ``provider: openai_compatible``: embeddings come from ``<base_url>/embeddings`` (an
    OpenAI-compatible server) for model ``name``, optionally truncated to ``dimensions``; the key
    is read from the environment variable ``api_key_env``. Frozen-encoder (adapter) recipes only.
    """

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    provider: Literal["local", "openai_compatible"] = "local"
    base_url: str | None = Field(None, description="openai_compatible: e.g. http://127.0.0.1:8000/v1")
    dimensions: int | None = Field(None, gt=0, description="openai_compatible: ask for embeddings of this size")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key (never stored)"
    )
    timeout: float = Field(60.0, gt=0, description="openai_compatible: seconds per request")
    max_retries: int = Field(5, ge=0, description="openai_compatible: retries on 429/5xx/timeouts")
    max_seq_length: int | None = Field(None, gt=0)
    query_prompt: str | None = Field(
        None, description="prompt text for queries; default: the checkpoint's own ('' = none)"
    )
    document_prompt: str | None = Field(
        None, description="prompt text for documents; default: the checkpoint's own ('' = none)"
    )
    query_prompt_name: str | None = Field(
        None, description="pick the query prompt by name from the checkpoint's saved prompts"
    )
    document_prompt_name: str | None = Field(
        None, description="pick the document prompt by name from the checkpoint's saved prompts"
    )
    batch_size: int = Field(64, gt=0, description="encoding batch size")
    encode_devices: list[str] | None = Field(
        None, description="encode on several processes, e.g. [cuda:0, cuda:1] or [cpu, cpu]"
    )
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _endpoint(self):
        for side in ("query", "document"):
            if getattr(self, f"{side}_prompt") is not None and getattr(self, f"{side}_prompt_name") is not None:
                raise ValueError(f"set {side}_prompt (a text) or {side}_prompt_name (a saved prompt's name), not both")
            if self.provider != "local" and getattr(self, f"{side}_prompt_name") is not None:
                raise ValueError(
                    f"{side}_prompt_name picks a checkpoint's saved prompt; an API model has none, so give "
                    f"{side}_prompt as text"
                )
        if self.provider == "openai_compatible" and not self.base_url:
            raise ValueError("provider 'openai_compatible' needs base_url, e.g. http://127.0.0.1:8000/v1")
        if (
            self.provider == "openai_compatible"
            and self.api_key_env
            and self.api_key_env.startswith(("sk-", "Bearer"))
        ):
            raise ValueError(
                "api_key_env names an environment variable, not the key itself; export the key and put its variable "
                "name here"
            )
        return self


class ColumnsConfig(Section):
    """Column names in a pair file or Hugging Face dataset. Only ``query`` and ``positive`` are required."""

    query: str = "query"
    positive: str = "positive"
    negative: str | None = None
    id: str | None = None
    domain: str | None = None


class DataConfig(Section):
    """Where the training and evaluation data come from.

    ``type`` may be left out: a builtin name, a BEIR folder (has ``corpus.jsonl``), a
    ``save_to_disk`` folder, or a pair file is recognised from ``name``/``path``. The whole
    section may also be a plain string, e.g. ``data=../shared/data/disfl_qa`` on the command line.
    """

    type: Literal["builtin", "pairs", "beir", "hf"]
    name: str | None = None
    path: str | None = None
    split: str | None = Field(None, description="Hugging Face dataset split, e.g. 'train'")
    columns: ColumnsConfig = ColumnsConfig()
    max_queries: int | None = Field(None, gt=0, description="use only the first N queries (quick runs)")

    @model_validator(mode="before")
    @classmethod
    def _infer_type(cls, value):
        if isinstance(value, str):
            value = {"name": value} if value in BUILTIN_DATASETS else {"path": value}
        if isinstance(value, dict) and "type" not in value:
            value = dict(value, type=_guess_type(value))
        return value

    @model_validator(mode="after")
    def _check_fields(self):
        if self.type == "builtin" and self.name not in BUILTIN_DATASETS:
            raise ValueError(f"builtin data needs name: one of {', '.join(BUILTIN_DATASETS)}")
        if self.type in ("pairs", "beir") and not self.path:
            raise ValueError(f"data type '{self.type}' needs a path")
        if self.type == "hf" and not (self.name or self.path):
            raise ValueError("data type 'hf' needs a dataset name or a save_to_disk path")
        return self


def _guess_type(value: dict) -> str:
    name, path = value.get("name"), value.get("path")
    if name in BUILTIN_DATASETS and not path:
        return "builtin"
    if path:
        p = Path(path)
        if (p / "corpus.jsonl").is_file():
            return "beir"
        if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        return "pairs"
    if name:
        return "hf"
    raise ValueError("data needs a builtin name, a path, or a Hugging Face dataset name")


class SplitConfig(Section):
    """How queries are split into train/val/test. Splits are always by query, and seeded.

    Set ``file`` to a ``splits.json`` from an earlier run to score several recipes on identical
    queries. A BEIR folder with ``qrels/test.tsv`` uses its own test split unless
    ``use_predefined`` is false.
    """

    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    group_by_domain: bool = False
    use_predefined: bool = True
    file: str | None = None

    @model_validator(mode="after")
    def _fractions_leave_training(self):
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(
                f"test_fraction + val_fraction must be < 1 to leave training queries, "
                f"got {self.test_fraction} + {self.val_fraction}"
            )
        return self


class NegativesConfig(Section):
    """Negatives added to each training example, beside the batch's other positives (in-batch).

    - ``none``: in-batch negatives only.
    - ``random``: documents not relevant to the query, drawn from the corpus (``pool: corpus``) or
      from a file of unrelated texts (``pool: file``: one per line, or JSONL with ``text``).
    - ``given``: the data's own negative column (``data.columns.negative``).
    - ``mined``: the documents the base model ranks highest for the query, skipping its positives
      (sentence-transformers' ``mine_hard_negatives``): ranks ``range_min`` to ``range_max``,
      ``relative_margin`` drops near-duplicates of the positive (score within that fraction of
      the positive's), ``max_score`` drops anything scoring above it.
    - ``bm25``: the documents BM25 (bm25s) ranks highest, skipping positives and documents whose
      text equals a positive's.

    Mined and BM25 negatives are found once, before training, over the train queries only.
    """

    strategy: Literal["none", "random", "given", "mined", "bm25"] = "random"
    per_query: int = Field(1, gt=0, description="negatives per training example")
    pool: Literal["corpus", "file"] = "corpus"
    file: str | None = None
    range_min: int = Field(0, ge=0, description="mined/bm25: skip this many top-ranked candidates")
    range_max: int | None = Field(
        None, gt=0, description="mined/bm25: consider candidates up to this rank (default: derived)"
    )
    relative_margin: float | None = Field(
        0.05, ge=0.0, lt=1.0, description="mined: drop candidates scoring above (1 - margin) x the positive's score"
    )
    max_score: float | None = Field(None, description="mined: drop candidates scoring above this")
    sampling: Literal["top", "random"] = "top"

    @model_validator(mode="after")
    def _consistent(self):
        if self.pool == "file" and not self.file:
            raise ValueError("pool 'file' needs negatives.file: a text or JSONL file of unrelated texts")
        if self.range_max is not None and self.range_max - self.range_min < self.per_query:
            raise ValueError(f"range_max - range_min must leave at least per_query={self.per_query} candidates")
        return self


class CacheConfig(Section):
    """On-disk embedding cache. ``dir`` defaults to ``$FINETUNE_CACHE`` or ``~/.cache/finetune/embeddings``."""

    enabled: bool = True
    dir: str | None = None


class OutputConfig(Section):
    """Where run directories are created: ``<dir>/<recipe name>-<timestamp>/``."""

    dir: str = "runs"


class EvalConfig(Section):
    """Extra scoring beyond the training data's test split."""

    also: list[DataConfig] = Field(
        [],
        description="more retrieval sets to score base and tuned on, each over its full corpus and its own test "
        "split (any data source: builtin name, BEIR folder, pairs file, Hugging Face dataset)",
    )


class ExportConfig(Section):
    """What ``model/`` holds beside the PyTorch weights."""

    onnx: bool = Field(
        False,
        description="also write model/onnx/ (fp32 and int8, sentence-transformers' ONNX layout), checked",
    )


class RecipeCore(Section):
    """Fields every recipe kind has: a name, a seed, a device, the data, its splits, extra sets to score,
    and where runs go."""

    name: str = "run"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: DataConfig
    splits: SplitConfig = SplitConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    def model_configs(self) -> dict[str, ModelConfig]:
        """Every encoder this recipe loads, by the field naming its checkpoint (``validate`` resolves each)."""
        return {
            f"{f}.name": getattr(self, f) for f in type(self).model_fields if isinstance(getattr(self, f), ModelConfig)
        }


class MergeConfig(Section):
    """Interpolation between the base model (s = 0) and the tuned one (s = 1) before export.

    LoRA scales the delta (weights = base + s x delta), the query adapter scales its residual, full
    fine-tuning interpolates the weights. ``auto`` picks s from ``grid`` by validation NDCG@10 of the
    training data, optionally allowing each ``eval.also`` set's validation NDCG@10 to fall at most
    ``max_drop`` below the base model's; the test split never takes part.
    """

    scale: float | Literal["auto"] = Field(1.0, description="s in [0, 1.5], or auto")
    grid: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="auto: the values of s to choose from")
    max_drop: float | None = Field(None, ge=0.0, description="auto: the largest NDCG@10 drop allowed on eval.also")

    @field_validator("scale")
    @classmethod
    def _scale(cls, value):
        if value != "auto" and not 0.0 <= value <= 1.5:
            raise ValueError(f"scale must be in [0, 1.5] or auto, got {value}")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= s <= 1.5 for s in value):
            raise ValueError(f"list one or more values of s in [0, 1.5], got {value}")
        return sorted(set(value))


class RecipeBase(RecipeCore):
    """A recipe over one encoder, ``model``."""

    model: ModelConfig = ModelConfig()
    merge: MergeConfig = MergeConfig()

    @model_validator(mode="after")
    def _max_drop_needs_extra_sets(self):
        if self.merge.max_drop is not None and not self.eval.also:
            raise ValueError(
                "merge.max_drop limits the drop on eval.also sets; add eval.also: [DATA, ...] or remove it"
            )
        return self
