"""Export a query adapter as a folder that plain sentence-transformers loads.

The saved model is ``[base modules..., Router]``: ``encode_query`` routes through the adapter
(built from sentence-transformers' own ``Dense`` and ``Normalize`` modules, so no code from this
toolkit is needed to load it) and ``encode_document`` through the base model only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finetune.adapter.modules import LinearAdapter, MLPAdapter


def adapter_as_modules(adapter: nn.Module) -> list[nn.Module]:
    """Sentence-transformers modules that compute exactly what ``adapter`` computes.

    A linear adapter is one ``Dense``. The residual MLP ``q + W2 relu(W1 q + b1) + b2`` uses the
    identity ``q = relu(q) - relu(-q)``: a first ``Dense`` with ReLU outputs
    ``[relu(q), relu(-q), relu(W1 q + b1)]`` and a second, linear ``Dense`` sums them with
    ``[I, -I, W2]`` and bias ``b2``.
    """
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    if isinstance(adapter, LinearAdapter):
        w, b = adapter.weight.detach().cpu(), adapter.delta.bias.detach().cpu()
        return [
            Dense(
                adapter.dim, adapter.dim, activation_function=nn.Identity(), init_weight=w.clone(), init_bias=b.clone()
            ),
            Normalize(),
        ]
    if isinstance(adapter, MLPAdapter):
        d, h = adapter.dim, adapter.hidden_dim
        eye = torch.eye(d)
        w1 = torch.cat([eye, -eye, adapter.up.weight.detach().cpu()])
        b1 = torch.cat([torch.zeros(2 * d), adapter.up.bias.detach().cpu()])
        w2 = torch.cat([eye, -eye, adapter.down.weight.detach().cpu()], dim=1)
        b2 = adapter.down.bias.detach().cpu().clone()
        return [
            Dense(d, 2 * d + h, activation_function=nn.ReLU(), init_weight=w1, init_bias=b1),
            Dense(2 * d + h, d, activation_function=nn.Identity(), init_weight=w2, init_bias=b2),
            Normalize(),
        ]
    raise TypeError(f"cannot export {type(adapter).__name__}")


def export_adapter_model(base_model, adapter: nn.Module, folder: str | Path, query_prompt: str | None = None):
    """Save ``base_model`` + ``adapter`` as one ``SentenceTransformer`` folder and return the model.

    Args:
        base_model: The frozen encoder the adapter was trained over.
        adapter: A trained :class:`LinearAdapter` or :class:`MLPAdapter`.
        folder: Where to save; load it later with ``SentenceTransformer(folder)``.
        query_prompt: Stored as the model's ``query`` prompt, so ``encode_query`` applies it.

    Example (not run: it needs a model, data or a server)::
        model = SentenceTransformer("runs/adapter-.../model")
        q = model.encode_query(["how do I get a building permit?"])   # adapted
        d = model.encode_document(["A bygglov is ..."])                 # base model
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Router

    modules = list(base_model.children())
    if not any(isinstance(m, Normalize) for m in modules):
        modules.append(Normalize())  # adapter training saw normalised base embeddings
    router = Router.for_query_document(query_modules=adapter_as_modules(adapter), document_modules=[Normalize()])
    model = SentenceTransformer(modules=[*modules, router], device="cpu")
    prompts = dict(base_model.prompts)
    if query_prompt:
        prompts["query"] = query_prompt
    model.prompts = prompts
    model.similarity_fn_name = "cosine"
    save_model_folder(model, folder)
    return model


def save_model_folder(model, folder: str | Path) -> None:
    """``model.save`` into a temporary sibling folder, then rename it into place (never half-written)."""
    import shutil

    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(str(partial))
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)


def card_facts(recipe, trainable: int) -> dict:
    """What the model card says of an adapter run's model (see :attr:`finetune.outcome.Outcome.card`)."""
    return {
        "base": recipe.model.name,
        "method": f"a {recipe.adapter.type} query adapter over frozen embeddings, {trainable:,} trained parameters; "
        f"loss {recipe.loss.type}",
        "changed": f"Only the query side changed. `encode_query` runs the base encoder and then the trained "
        f"{recipe.adapter.type} adapter; `encode_document` is the base encoder, unchanged, so an index built with "
        "the base model stays valid.",
    }
