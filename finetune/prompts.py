"""Query and document prompts: the checkpoint's own, unless the recipe says otherwise.

Models such as e5, bge, nomic, Qwen3-Embedding and EmbeddingGemma are trained with a prefix on
queries (``query: ``, ``Instruct: ...\\nQuery: ``) and often another on documents. They save them
in ``config_sentence_transformers.json`` (``prompts``, ``default_prompt_name``), and plain
sentence-transformers applies them in ``encode_query``/``encode_document``. A run must train and
score with the same prompts, or its numbers describe another model.

:func:`resolve_prompts` decides the two texts, in this order: the recipe's ``query_prompt`` text,
else its ``query_prompt_name`` (a key of the checkpoint's prompts), else what plain
``encode_query`` would use (the ``query`` prompt, else the default prompt). Documents look for
``document``, ``passage`` and ``corpus``, as ``encode_document`` does. :func:`apply_prompts`
stores the result in the model, so every encode call and every exported folder carries it.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FinetuneError

DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclass(frozen=True)
class Prompts:
    """The prompt texts a run uses (``None``: no prompt) and where each came from."""

    query: str | None
    document: str | None
    query_origin: str = "none"
    document_origin: str = "none"

    def for_columns(self, columns: list[str]) -> dict[str, str]:
        """The trainer's ``prompts`` argument: the query prompt on ``anchor``, the document prompt on the rest."""
        out = {}
        for column in columns:
            text = self.query if column == "anchor" else self.document
            if text:
                out[column] = text
        return out

    def describe(self) -> str:
        """One line for the log, e.g. ``prompts: query 'query: ' (checkpoint), document none``."""

        def one(text, origin):
            return f"{text!r} ({origin})" if text else "none"

        return (
            f"prompts: query {one(self.query, self.query_origin)}, document {one(self.document, self.document_origin)}"
        )


def _pick(config, side: str, saved: dict, default_name: str | None, names: tuple[str, ...]) -> tuple[str | None, str]:
    text, name = getattr(config, f"{side}_prompt"), getattr(config, f"{side}_prompt_name")
    if text is not None:
        return text or None, "recipe"
    if name is not None:
        if name not in saved:
            have = ", ".join(sorted(saved)) or "none"
            raise FinetuneError(
                f"prompt name '{name}' is not one of the checkpoint's prompts ({have})",
                where=f"model.{side}_prompt_name",
            )
        return saved[name] or None, f"checkpoint '{name}'"
    for candidate in names:
        if candidate in saved:
            return saved[candidate] or None, f"checkpoint '{candidate}'" if saved[candidate] else "none"
    if default_name and saved.get(default_name):
        return saved[default_name], f"checkpoint default '{default_name}'"
    return None, "none"


def resolve_prompts(model, config) -> Prompts:
    """The prompts a run with ``config`` (a :class:`~finetune.config.ModelConfig`) uses for ``model``.

    Args:
        model: A ``SentenceTransformer`` (its ``prompts`` and ``default_prompt_name`` are read)
            or an API embedder (no saved prompts).
        config: The recipe's model section.

    Returns:
        The query and document prompt texts.

    Example:
        >>> from finetune.config import ModelConfig
        >>> class Saved: prompts, default_prompt_name = {"query": "query: ", "passage": "passage: "}, None
        >>> resolve_prompts(Saved(), ModelConfig()).document
        'passage: '
        >>> resolve_prompts(Saved(), ModelConfig(query_prompt="")).query is None
        True
    """
    saved = dict(getattr(model, "prompts", None) or {})
    default_name = getattr(model, "default_prompt_name", None)
    query, q_origin = _pick(config, "query", saved, default_name, ("query",))
    document, d_origin = _pick(config, "document", saved, default_name, DOCUMENT_PROMPT_NAMES)
    return Prompts(query, document, q_origin, d_origin)


def apply_prompts(model, prompts: Prompts) -> None:
    """Store ``prompts`` as the model's ``query`` and ``document`` prompts (others are kept).

    After this, plain ``encode_query``/``encode_document`` (and a saved copy of the model) use
    exactly the run's prompts; an empty string stands for "no prompt", as in sentence-transformers.
    Resolve once, before applying: a ``*_prompt_name`` may name the very prompt this overwrites.
    """
    saved = dict(getattr(model, "prompts", None) or {})
    saved["query"] = prompts.query or ""
    saved["document"] = prompts.document or ""
    model.prompts = saved
