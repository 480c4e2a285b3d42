"""The cross-model projection: a map from the large encoder's query space into the small encoder's.

Saved and loaded as a folder of safetensors weights and a config; :mod:`finetune.cross.export`
puts it into a plain sentence-transformers ``Router`` model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.weights import load_layer, save_layer


class Projection(nn.Module):
    """The query map into the document model's space, output L2-normalised.

    ``input: large`` (ERA): ``normalize(f(q_large))``. ``input: both``: the input row is
    ``[q_large ; q_small]`` and the output ``normalize(small_weight * q_small + f(q_large))``; ``f`` starts at
    zero, so an untrained projection *is* the small model and training can only move away from it when
    validation says so. ``f`` is linear or a one-hidden-layer ReLU MLP.

    Args:
        d_in: Query-model embedding size (e.g. 768).
        d_out: Document-model embedding size (e.g. 384).
        kind: ``linear`` or ``mlp``.
        hidden_dim: MLP hidden width.
        input: ``large`` or ``both``.
        small_weight: ``input: both`` only: the weight of the small model's own query embedding.

    Example:
        >>> p = Projection(768, 384)
        >>> p(torch.randn(2, 768)).shape
        torch.Size([2, 384])
        >>> mixed = Projection(768, 384, input="both")
        >>> q_small = F.normalize(torch.randn(2, 384), dim=-1)
        >>> bool(torch.allclose(mixed(torch.cat([torch.randn(2, 768), q_small], dim=1)), q_small))
        True
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        kind: str = "linear",
        hidden_dim: int = 1024,
        input: str = "large",
        small_weight: float = 1.0,
    ):
        super().__init__()
        self.d_in, self.d_out, self.kind, self.hidden_dim, self.input = d_in, d_out, kind, hidden_dim, input
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(d_in, d_out))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(d_in, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, d_out))
        else:
            raise ValueError(f"unknown projection type {kind!r}")
        if input not in ("large", "both"):
            raise ValueError(f"unknown projection input {input!r}")
        # a buffer, not a parameter: saved with the weights, fixed during label training
        self.register_buffer("small_weight", torch.tensor(float(small_weight) if input == "both" else 0.0))
        if input == "both":
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    @property
    def width(self) -> int:
        """Input row width: ``d_in``, or ``d_in + d_out`` for ``input: both``."""
        return self.d_in + (self.d_out if self.input == "both" else 0)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.input == "large":
            return F.normalize(self.layers(q), dim=-1)
        large, small = q[:, : self.d_in], q[:, self.d_in :]
        return F.normalize(self.small_weight * small + self.layers(large), dim=-1)

    @torch.no_grad()
    def set_map(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Make the linear ``f`` equal ``q -> weight @ q + bias`` (``weight``: ``[d_out, d_in]``)."""
        if self.kind != "linear":
            raise ValueError("set_map needs a linear projection")
        self.layers[0].weight.copy_(weight)
        self.layers[0].bias.copy_(torch.zeros(self.d_out) if bias is None else bias)

    @torch.no_grad()
    def mixed(self, mix: float, probes: torch.Tensor) -> Projection:
        """This projection's ``f`` as the large side of an ``input: both`` projection.

        Args:
            mix: Weight of the projected large query, in [0, 1]; 0 is the small model alone, 1 this projection.
            probes: ``[n, d_in]`` large-model queries; ``f`` is scaled by their mean output norm, so the two
                sides are mixed at equal length.

        Returns:
            A new projection: ``normalize((1 - mix) * q_small + mix * f(q_large) / mean |f|)``.
        """
        if self.input != "large":
            raise ValueError("mixed() takes an input: large projection")
        out = Projection(self.d_in, self.d_out, self.kind, self.hidden_dim, "both", 1.0 - mix)
        out.layers.load_state_dict(self.layers.state_dict())
        length = self.layers(probes).norm(dim=-1).mean().clamp_min(1e-12)
        out.layers[-1].weight.mul_(mix / length)
        out.layers[-1].bias.mul_(mix / length)
        return out.to(probes.device)

    def describe(self) -> dict:
        return {
            "type": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "hidden_dim": self.hidden_dim,
            "input": self.input,
            "small_weight": float(self.small_weight),
        }

    def as_modules(self) -> list[nn.Module]:
        """Sentence-transformers ``Dense`` (+ ``Normalize``) modules computing ``f`` (+ the normalisation)."""
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
        return dense if self.input == "both" else [*dense, Normalize()]


def save_projection(projection: Projection, folder: str | Path) -> None:
    """Write ``projection.safetensors`` and ``projection_config.json`` into ``folder`` (atomically)."""
    save_layer(projection, folder, "projection", projection.describe())


def load_projection(folder: str | Path) -> Projection:
    """Load a projection saved by :func:`save_projection`; shapes are checked against its config."""
    return load_layer(
        folder,
        "projection",
        lambda c: Projection(
            c["d_in"],
            c["d_out"],
            c["type"],
            c.get("hidden_dim", 1024),
            c.get("input", "large"),
            c.get("small_weight", 1.0),
        ),
        "point at the projection folder of a cross_adapter run",
    )
