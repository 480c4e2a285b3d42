"""The encoder recipe's loss: MultipleNegativesRankingLoss, cached (GradCache) and/or Matryoshka.

sentence-transformers' losses, composed as its docs compose them: the cached loss replaces the
plain one (same value and gradients, memory of a mini-batch), and ``MatryoshkaLoss`` wraps
either one.
"""

from __future__ import annotations

from finetune.qlora.config import EncoderLossConfig


def build_loss(model, config: EncoderLossConfig, mini_batch_size: int | None, gather: bool):
    """The training loss for ``model``.

    Args:
        model: The SentenceTransformer being trained.
        config: The recipe's ``loss`` section.
        mini_batch_size: The resolved ``loss.mini_batch_size`` (``auto`` already replaced), for the cached loss.
        gather: Gather the other ranks' embeddings as negatives (data-parallel runs).

    Returns:
        A loss module for ``SentenceTransformerTrainer``.

    Example (not run: it needs a model)::
        loss = build_loss(model, EncoderLossConfig(cached=True, matryoshka_dims=[384, 128]), 8, gather=False)
    """
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    if config.cached:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, gather_across_devices=gather)
    else:
        loss = MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if config.matryoshka_dims:
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=list(config.matryoshka_dims))
    return loss


def describe_loss(config: EncoderLossConfig, mini_batch_size: int | None) -> str:
    """``MNRL``, ``cached MNRL (mini-batch 8)``, ``... x Matryoshka [384, 128]`` for the run's first line."""
    text = f"cached MNRL (mini-batch {mini_batch_size})" if config.cached else "MNRL"
    return text + (f" x Matryoshka {list(config.matryoshka_dims)}" if config.matryoshka_dims else "")
