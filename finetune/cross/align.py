"""Phase 1 of ERA: identical-text alignment. Tensors in, trained projection out.

The same texts are embedded by both encoders; the projection learns to map the large model's
embedding of a text onto the small model's embedding of that same text. No relevance label is
used, so any unlabelled text (corpus documents, query logs) can train it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finetune.cross.config import AlignmentConfig
from finetune.errors import FinetuneError


def alignment_loss(projected: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``1 - cos`` (``cosine``) or squared error (``mse``) between projected and target embeddings, averaged."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(projected, target, dim=-1)).mean()
    return F.mse_loss(projected, target, reduction="sum") / len(projected)


@torch.no_grad()
def mean_alignment_loss(
    projection: torch.nn.Module, source: torch.Tensor, target: torch.Tensor, kind: str = "cosine"
) -> float:
    """The alignment loss of ``projection`` over all of ``source``/``target``."""
    projection.eval()
    return float(alignment_loss(projection(source), target, kind))


def align_projection(
    projection: torch.nn.Module, source: torch.Tensor, target: torch.Tensor, config: AlignmentConfig, seed: int
) -> list[dict]:
    """Train ``projection`` so ``projection(source[i])`` matches ``target[i]`` (same text, two encoders).

    Args:
        projection: Maps ``[B, d_q]`` to normalised ``[B, d_d]``.
        source: ``[T, d_q]`` large-model embeddings of T texts.
        target: ``[T, d_d]`` small-model embeddings of the same T texts, row for row.
        config: Loss, epochs, batch size, learning rate.
        seed: Fixes the batch order.

    Returns:
        One dict per epoch (epoch 0 = before training): ``epoch``, ``loss`` over all texts.
    """
    if len(source) != len(target):
        raise ValueError(f"source has {len(source)} rows, target {len(target)}; they must be the same texts")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    history = [{"epoch": 0, "loss": mean_alignment_loss(projection, source, target, config.loss)}]
    for epoch in tqdm(range(1, config.epochs + 1), desc="align", unit="epoch", leave=False):
        projection.train()
        order = torch.randperm(len(source), generator=generator).to(source.device)
        for start in range(0, len(source), config.batch_size):
            rows = order[start : start + config.batch_size]
            loss = alignment_loss(projection(source[rows]), target[rows], config.loss)
            if not torch.isfinite(loss):
                raise FinetuneError(
                    f"alignment loss is {loss.item()} at epoch {epoch}; lower alignment.lr", where="alignment"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        history.append({"epoch": epoch, "loss": mean_alignment_loss(projection, source, target, config.loss)})
    projection.eval()
    return history
