"""The exported ``cross_adapter`` model: a plain sentence-transformers ``Router``.

The exported folder routes ``encode_query`` through the large query encoder and the projection,
and ``encode_document`` through the small document encoder alone, so an existing index built with
the small model stays valid and no code from this toolkit is needed to load it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from finetune.adapter.export import save_model_folder
from finetune.cross.mixed import MixedQuery
from finetune.cross.projection import Projection


def export_router_model(
    query_model,
    document_model,
    projection: Projection,
    folder: str | Path,
    query_prompt=None,
    document_prompt=None,
    small_query_prompt=None,
):
    """Save one ``SentenceTransformer`` whose query route is the projected query and whose document route
    is ``document_model``; return the saved model.

    ``input: large`` saves plain sentence-transformers modules (the large encoder, ``Dense``,
    ``Normalize``). ``input: both`` needs both encoders on the query route and saves one
    :class:`~finetune.cross.mixed.MixedQuery` module holding them (loading needs this package).

    Args:
        query_model: The large encoder (its embeddings are normalised before the projection, as in training).
        document_model: The small encoder the document index was built with.
        projection: The trained :class:`Projection`.
        folder: Where to save; load it with ``SentenceTransformer(folder)``.
        query_prompt: The large encoder's query prompt.
        document_prompt: Stored as the ``document`` prompt.
        small_query_prompt: ``input: both``: the small encoder's query prompt.

    Example (not run: it needs a model, data or a server)::
        model = SentenceTransformer("runs/cross-adapter-faq-.../model")
        model.encode_query(["how do I get a building permit?"]).shape   # mpnet + projection
        (1, 384)
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Router

    def normalised(model) -> list[nn.Module]:
        modules = list(model.children())
        return modules if any(isinstance(m, Normalize) for m in modules) else [*modules, Normalize()]

    if projection.input == "both":
        query_modules = [MixedQuery(query_model, document_model, projection, query_prompt, small_query_prompt)]
        query_prompt = None  # each encoder's own query prompt is applied inside MixedQuery
    else:
        query_modules = [*normalised(query_model), *projection.as_modules()]
    router = Router.for_query_document(query_modules=query_modules, document_modules=normalised(document_model))
    model = SentenceTransformer(modules=[router], device="cpu")
    model.prompts = {k: v for k, v in {"query": query_prompt, "document": document_prompt}.items() if v}
    model.similarity_fn_name = "cosine"
    save_model_folder(model, folder)
    return model


def card_facts(recipe, method: str) -> dict:
    """What the model card says of a cross_adapter run's model (see :attr:`finetune.outcome.Outcome.card`)."""
    large, small = f"`{recipe.query_model.name}`", f"`{recipe.document_model.name}`"
    return {
        "base": recipe.document_model.name,
        "base_label": "small model alone",
        "method": f"a {recipe.projection.type} projection from {large} into {small}'s space ({method})",
        "changed": f"Only the query side changed. `encode_query` runs {large} and a trained projection into "
        f"{small}'s space; `encode_document` is {small}, unchanged, so an index built with it stays valid.",
    }
