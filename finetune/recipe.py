"""Load a recipe YAML, apply ``key.sub=value`` overrides, validate it into a typed object.

Every problem becomes one :class:`~finetune.errors.FinetuneError` line naming the file and the
field, e.g. ``recipes/adapter.yaml: train.epoch: unknown field (did you mean 'epochs'?)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config import RecipeCore
from finetune.errors import FinetuneError, did_you_mean
from finetune.field_rules import check_fields
from finetune.kinds import KINDS

Recipe = RecipeCore  # every kind's schema subclasses it (finetune.kinds.KINDS names them)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file with ``yaml.safe_load``; an empty or non-mapping file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(
            "file not found; pass the path of a recipe YAML, e.g. recipes/adapter.yaml", where=str(path)
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise FinetuneError(
            f"not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax", where=f"{path}{line}"
        ) from None
    if raw is None:
        raise FinetuneError("file is empty; a recipe needs at least 'kind' and 'data'", where=str(path))
    if not isinstance(raw, dict):
        raise FinetuneError("a recipe must be a YAML mapping of keys to values", where=str(path))
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str = "command line") -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied; values are parsed as YAML scalars.

    Example:
        >>> apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.01", "seed=7"])
        {'train': {'lr': 0.01}, 'seed': 7}
    """
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise FinetuneError(f"override '{item}' must look like key.sub=value, e.g. train.epochs=5", where=where)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise FinetuneError(
                    f"cannot set '{key}': '{dotted}' is {child!r}, not a mapping; set '{dotted}=...' instead",
                    where=where,
                )
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def validate_recipe(raw: dict[str, Any], where: str = "recipe", check: bool = True) -> Recipe:
    """Validate a raw mapping into the recipe class named by its ``kind``; ``check=False`` skips the
    field rules (:mod:`finetune.field_rules`), for a caller that resolves them itself (a sweep)."""
    kind = raw.get("kind")
    if kind not in KINDS:
        known = ", ".join(sorted(KINDS))
        got = "missing" if kind is None else f"'{kind}' is not a recipe kind{did_you_mean(str(kind), KINDS)}"
        raise FinetuneError(f"{got}; use one of: {known}", where=f"{where}: kind")
    cls = KINDS[kind].schema
    try:
        recipe = cls.model_validate(raw)
    except ValidationError as exc:
        raise FinetuneError(_describe(exc, cls), where=where) from None
    if check:
        check_fields(recipe, KINDS[kind].field_rules(), where)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, check: bool = True) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: The recipe YAML.
        overrides: ``key.sub=value`` strings applied on top of the file.

    Returns:
        The typed recipe, e.g. an :class:`~finetune.adapter.config.AdapterRecipe`.
    """
    raw = apply_overrides(read_yaml(path), overrides or [])
    _reinfer_data(raw, overrides or [])
    return validate_recipe(raw, where=str(path), check=check)


def _reinfer_data(raw: dict[str, Any], overrides: list[str]) -> None:
    """``data.path=X`` (or ``data.name=X``) on the command line means "this data": the file's
    ``type`` and other source field no longer apply, so the type is inferred again from X."""
    keys = {item.partition("=")[0] for item in overrides}
    data = raw.get("data")
    if not isinstance(data, dict) or "data.type" in keys or not keys & {"data.path", "data.name"}:
        return
    data.pop("type", None)
    if "data.name" not in keys:
        data.pop("name", None)
    if "data.path" not in keys:
        data.pop("path", None)


def _describe(exc: ValidationError, cls: type[BaseModel]) -> str:
    """Turn pydantic's errors into '; '-joined 'field: problem' phrases with did-you-mean hints."""
    phrases = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
        field = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            names = _field_names(cls, loc[:-1])
            hint = did_you_mean(loc[-1], names) or f" (known: {', '.join(names)})"
            elsewhere = [
                k.name for k in KINDS.values() if k.schema is not cls and loc[-1] in _field_names(k.schema, loc[:-1])
            ]
            moved = [
                f"{section}.{loc[-1]}"
                for section in cls.model_fields
                if [section] != loc[:-1] and loc[-1] in _field_names(cls, [section])
            ]
            if moved:  # a real field of another section (train.mini_batch_size is loss.mini_batch_size)
                hint = f" (did you mean {' or '.join(moved)}?)"
            if elsewhere:  # a real field, of another kind: say so rather than guess at a spelling
                kind = cls.model_fields["kind"].default
                why = getattr(cls, "unavailable", {}).get(loc[0])
                why = f": {why}" if why else ""
                hint = f" for {kind} recipes (it is a field of {', '.join(elsewhere)} recipes{why}); remove it"
            phrases.append(f"{field}: unknown field{hint}")
        elif err["type"] == "missing":
            described = getattr(cls.model_fields.get(loc[0]), "description", None) if len(loc) == 1 else None
            phrases.append(f"{field}: required field is missing{f' ({described})' if described else ''}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            phrases.append(f"{field}: {msg}{shown}")
    return "; ".join(phrases)


def _field_names(cls: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = cls.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return list(cls.model_fields)


def dump_recipe(recipe: BaseModel) -> str:
    """The fully resolved recipe as YAML (every default spelled out), for the run directory."""
    dumped = recipe.model_dump(mode="json")
    return yaml.safe_dump({"kind": dumped.pop("kind"), **dumped}, sort_keys=False)
