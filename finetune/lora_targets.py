"""Which linear layers of an encoder get LoRA adapters when the recipe says ``target_modules: auto``.

Known architectures get their attention and MLP projections by name. Any other architecture gets
every ``nn.Linear`` inside the transformer except pooler, classifier and LM-head layers (peft's
"all-linear" rule), so a new family trains instead of being refused; the run prints the list.
"""

from __future__ import annotations

import re

import torch

from finetune.errors import FinetuneError

_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT = ("query", "key", "value", "dense")

# model_type -> the linear layers' own names (the last part of the module path)
TARGETS: dict[str, tuple[str, ...]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": ("q", "k", "v", "o"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
    "modernbert": ("Wqkv", "Wo", "Wi"),
    **{t: _DECODER for t in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral")},
}
# never adapted: they are not part of the sentence embedding's path, or are task heads
EXCLUDED = re.compile(r"(^|\.)(pooler|classifier|lm_head|score|qa_outputs)(\.|$)")


def linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` (and 4-bit ``Linear4bit``) layers in ``model``, heads excluded."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not EXCLUDED.search(name)
    ]


def auto_targets(model: torch.nn.Module, model_type: str | None) -> tuple[list[str], str]:
    """The full names of the layers to adapt in ``model`` (a transformers model), and how they were chosen.

    Args:
        model: The transformer inside the encoder (``SentenceTransformer[0].auto_model``).
        model_type: ``config.model_type``, e.g. ``bert`` or ``qwen3``.

    Returns:
        ``(names, rule)``: full module names, and ``"<model_type> table"`` or ``"all-linear fallback"``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> names, rule = auto_targets(BertModel(BertConfig(num_hidden_layers=1, hidden_size=32,
        ...     num_attention_heads=2, intermediate_size=64)), "bert")
        >>> rule, sorted({n.split(".")[-1] for n in names})
        ('bert table', ['dense', 'key', 'query', 'value'])
    """
    candidates = linear_names(model)
    wanted = TARGETS.get(model_type or "")
    if wanted is not None:
        names = [n for n in candidates if n.rsplit(".", 1)[-1] in wanted]
        if names:
            return names, f"{model_type} table"
    if not candidates:
        raise FinetuneError(
            f"model_type '{model_type}' has no linear layers to adapt; set lora.target_modules",
            where="recipe: lora.target_modules",
        )
    return candidates, "all-linear fallback"


def requested_targets(model: torch.nn.Module, requested: list[str]) -> list[str]:
    """The layers matching the recipe's ``lora.target_modules`` (layer names or full paths); none is an error."""
    candidates = linear_names(model)
    names = [n for n in candidates if n in requested or n.rsplit(".", 1)[-1] in requested]
    if not names:
        have = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise FinetuneError(
            f"{requested} match no linear layer of this model; its linear layers are named {', '.join(have)}",
            where="recipe: lora.target_modules",
        )
    return names


def resolve_targets(model: torch.nn.Module, target_modules) -> tuple[list[str], str | None]:
    """``lora.target_modules`` (``auto`` or names) resolved on ``model``: ``(names, rule)``, where
    ``rule`` says how ``auto`` chose them and is ``None`` for a requested list."""
    if target_modules != "auto":
        return requested_targets(model, list(target_modules)), None
    return auto_targets(model, getattr(getattr(model, "config", None), "model_type", None))


def summarise(names: list[str]) -> str:
    """``q_proj, k_proj, ... (14 layers)`` for the one "what ran" line."""
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return f"{', '.join(kinds)} ({len(names)} layers)"
