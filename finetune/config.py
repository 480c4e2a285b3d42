"""Recipe sections shared by every recipe kind: model, data, splits, cache, output.

Each section is a pydantic model with ``extra="forbid"``, so a misspelt key fails loudly with a
did-you-mean instead of being ignored. Recipe kinds (``adapter``, ``qlora``, ...) compose these
sections with their own training sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_DATASETS = ("construction-faq",)


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which encoder to load and how to encode with it.

    ``name`` is a local folder, a Hugging Face Hub id, or a model that an installed package
    carries (see :mod:`finetune.models`).
    """

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_seq_length: int | None = Field(None, gt=0)
    query_prompt: str | None = None
    document_prompt: str | None = None
    batch_size: int = Field(64, gt=0, description="encoding batch size")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value


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


class CacheConfig(Section):
    """On-disk embedding cache. ``dir`` defaults to ``$FINETUNE_CACHE`` or ``~/.cache/finetune/embeddings``."""

    enabled: bool = True
    dir: str | None = None


class OutputConfig(Section):
    """Where run directories are created: ``<dir>/<recipe name>-<timestamp>/``."""

    dir: str = "runs"


class RecipeCore(Section):
    """Fields every recipe kind has: a name, a seed, a device, the data, its splits, and where runs go."""

    name: str = "run"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: DataConfig
    splits: SplitConfig = SplitConfig()
    output: OutputConfig = OutputConfig()

    def model_configs(self) -> list[ModelConfig]:
        """Every encoder this recipe loads (``validate`` resolves each)."""
        return [getattr(self, f) for f in type(self).model_fields if isinstance(getattr(self, f), ModelConfig)]


class RecipeBase(RecipeCore):
    """A recipe over one encoder, ``model``."""

    model: ModelConfig = ModelConfig()
