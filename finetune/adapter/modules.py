"""Query adapters: small layers applied to a frozen encoder's query embeddings.

Both start as the identity map, so a freshly built adapter scores exactly like the base model.
Outputs are L2-normalised, like the base embeddings they stand beside.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.weights import load_layer, save_layer


class LinearAdapter(nn.Module):
    """``normalize(W q + b)`` with ``W = I + Δ`` (Chroma's embedding adapter, d×d).

    ``Δ`` and ``b`` start at zero, so the adapter starts as the identity, and weight decay pulls
    ``W`` back towards the identity (the base model) rather than towards zero.

    Example:
        >>> adapter = LinearAdapter(384)
        >>> q = F.normalize(torch.randn(2, 384), dim=-1)
        >>> torch.allclose(adapter(q), q)
        True
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.delta = nn.Linear(dim, dim)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix ``W = I + Δ``."""
        return torch.eye(self.dim, device=self.delta.weight.device) + self.delta.weight

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q + self.delta(q), dim=-1)


class MLPAdapter(nn.Module):
    """Residual MLP ``normalize(q + W2 relu(W1 q + b1) + b2)``; ``W2``, ``b2`` start at zero, so it starts as the
    identity.
    """

    def __init__(self, dim: int, hidden_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.up = nn.Linear(dim, hidden_dim)
        self.down = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q + self.down(self.dropout(F.relu(self.up(q)))), dim=-1)


def build_adapter(kind: str, dim: int, hidden_dim: int = 2048, dropout: float = 0.0) -> nn.Module:
    """A fresh identity-initialised adapter of ``kind`` (``linear`` or ``mlp``) for ``dim``-d embeddings."""
    if kind == "linear":
        return LinearAdapter(dim)
    if kind == "mlp":
        return MLPAdapter(dim, hidden_dim, dropout)
    raise ValueError(f"unknown adapter type {kind!r}")


def _describe(adapter: nn.Module) -> dict:
    if isinstance(adapter, LinearAdapter):
        return {"type": "linear", "dim": adapter.dim}
    return {"type": "mlp", "dim": adapter.dim, "hidden_dim": adapter.hidden_dim}


def save_adapter(adapter: nn.Module, folder: str | Path) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``folder`` (atomically)."""
    save_layer(adapter, folder, "adapter", _describe(adapter))


def load_adapter(folder: str | Path) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter`; the weights' shapes are checked against its config."""
    return load_layer(
        folder,
        "adapter",
        lambda c: build_adapter(c["type"], c["dim"], c.get("hidden_dim", 2048)),
        "point at a folder written by save_adapter (a run directory)",
    )
