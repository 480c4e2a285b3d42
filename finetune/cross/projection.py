"""The cross-model projection and its export as a plain sentence-transformers ``Router`` model.

The exported folder routes ``encode_query`` through the large query encoder and the projection,
and ``encode_document`` through the small document encoder alone, so an existing index built with
the small model stays valid and no code from this toolkit is needed to load it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.weights import load_layer, save_layer


class Projection(nn.Module):
    """``normalize(f(q))`` from d_in to d_out, with ``f`` linear or a one-hidden-layer ReLU MLP.

    Args:
        d_in: Query-model embedding size (e.g. 768).
        d_out: Document-model embedding size (e.g. 384).
        kind: ``linear`` or ``mlp``.
        hidden_dim: MLP hidden width.

    Example:
        >>> p = Projection(768, 384)
        >>> p(torch.randn(2, 768)).shape
        torch.Size([2, 384])
    """

    def __init__(self, d_in: int, d_out: int, kind: str = "linear", hidden_dim: int = 1024):
        super().__init__()
        self.d_in, self.d_out, self.kind, self.hidden_dim = d_in, d_out, kind, hidden_dim
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(d_in, d_out))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(d_in, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, d_out))
        else:
            raise ValueError(f"unknown projection type {kind!r}")

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(q), dim=-1)

    def describe(self) -> dict:
        return {"type": self.kind, "d_in": self.d_in, "d_out": self.d_out, "hidden_dim": self.hidden_dim}

    def as_modules(self) -> list[nn.Module]:
        """Sentence-transformers ``Dense`` + ``Normalize`` modules computing exactly this projection."""
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize

        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        dense = []
        for i, layer in enumerate(linears):
            last = i == len(linears) - 1
            dense.append(
                Dense(
                    layer.in_features,
                    layer.out_features,
                    activation_function=nn.Identity() if last else nn.ReLU(),
                    init_weight=layer.weight.detach().cpu().clone(),
                    init_bias=layer.bias.detach().cpu().clone(),
                )
            )
        return [*dense, Normalize()]


def save_projection(projection: Projection, folder: str | Path) -> None:
    """Write ``projection.safetensors`` and ``projection_config.json`` into ``folder`` (atomically)."""
    save_layer(projection, folder, "projection", projection.describe())


def load_projection(folder: str | Path) -> Projection:
    """Load a projection saved by :func:`save_projection`; shapes are checked against its config."""
    return load_layer(
        folder,
        "projection",
        lambda c: Projection(c["d_in"], c["d_out"], c["type"], c.get("hidden_dim", 1024)),
        "point at the projection folder of a cross_adapter run",
    )


def export_router_model(
    query_model, document_model, projection: Projection, folder: str | Path, query_prompt=None, document_prompt=None
):
    """Save one ``SentenceTransformer`` whose query route is ``query_model`` + ``projection`` and whose
    document route is ``document_model``; return the saved model.

    Args:
        query_model: The large encoder (its embeddings are normalised before the projection, as in training).
        document_model: The small encoder the document index was built with.
        projection: The trained :class:`Projection`.
        folder: Where to save; load it with ``SentenceTransformer(folder)``.
        query_prompt: Stored as the model's ``query`` prompt, so ``encode_query`` applies it.
        document_prompt: Stored as the ``document`` prompt.

    Example (not run: it needs a model, data or a server)::
        model = SentenceTransformer("runs/cross-adapter-faq-.../model")
        model.encode_query(["how do I get a building permit?"]).shape   # mpnet + projection
        (1, 384)
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Router

    from finetune.adapter.export import save_model_folder

    def normalised(model) -> list[nn.Module]:
        modules = list(model.children())
        return modules if any(isinstance(m, Normalize) for m in modules) else [*modules, Normalize()]

    router = Router.for_query_document(
        query_modules=[*normalised(query_model), *projection.as_modules()],
        document_modules=normalised(document_model),
    )
    model = SentenceTransformer(modules=[router], device="cpu")
    model.prompts = {k: v for k, v in {"query": query_prompt, "document": document_prompt}.items() if v}
    model.similarity_fn_name = "cosine"
    save_model_folder(model, folder)
    return model
