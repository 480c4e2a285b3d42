"""Adapter losses: tensors in, a scalar out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def triplet_loss(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """Triplet margin loss with L2 distance (p=2), each query against each of its negatives.

    Args:
        queries: ``[B, d]`` adapted query embeddings.
        positives: ``[B, d]`` relevant document embeddings.
        negatives: ``[B, k, d]`` non-relevant document embeddings.
        margin: Required gap between negative and positive distance.
    """
    k = negatives.shape[1]
    anchor = queries.unsqueeze(1).expand(-1, k, -1).reshape(-1, queries.shape[-1])
    positive = positives.unsqueeze(1).expand(-1, k, -1).reshape(-1, queries.shape[-1])
    return F.triplet_margin_loss(anchor, positive, negatives.reshape(-1, queries.shape[-1]), margin=margin, p=2)


def infonce_loss(
    queries: torch.Tensor, candidates: torch.Tensor, exclude: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE (MultipleNegativesRankingLoss): query ``i``'s positive is candidate ``i``.

    Args:
        queries: ``[B, d]`` adapted, normalised query embeddings.
        candidates: ``[C, d]`` normalised documents, C >= B: the batch's positives first, then negatives.
        exclude: ``[B, C]`` bool, True where a candidate is relevant to the query but is not its target
            (another positive of the same query), so it is not pushed away.
        temperature: Softmax temperature (0.05 = scale 20, as in sentence-transformers).
    """
    logits = queries @ candidates.T / temperature
    logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))
