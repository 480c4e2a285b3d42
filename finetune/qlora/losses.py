"""The encoder recipe's loss: MultipleNegativesRankingLoss, cached (GradCache) and/or Matryoshka.

sentence-transformers' losses, composed as its docs compose them: the cached loss replaces the
plain one (same value and gradients, memory of a mini-batch), and ``MatryoshkaLoss`` wraps
either one.
"""

from __future__ import annotations

import torch

from finetune.qlora.config import EncoderLossConfig


def build_loss(model, config: EncoderLossConfig, mini_batch_size: int | None, gather: bool, teacher=None):
    """The training loss for ``model``.

    Args:
        model: The SentenceTransformer being trained.
        config: The recipe's ``loss`` section.
        mini_batch_size: The resolved ``loss.mini_batch_size`` (``auto`` already replaced), for the cached loss.
        gather: Gather the other ranks' embeddings as negatives (data-parallel runs).
        teacher: A :class:`~finetune.qlora.teacher.Distillation`: its loss instead (:func:`distillation_loss`).

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

    if teacher is not None:
        return distillation_loss(model, teacher.config, teacher.temperature, teacher.embeddings)
    if config.cached:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, gather_across_devices=gather)
    else:
        loss = MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if config.matryoshka_dims:
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=list(config.matryoshka_dims))
    return loss


def describe_loss(config: EncoderLossConfig, mini_batch_size: int | None, teacher=None) -> str:
    """``MNRL``, ``cached MNRL (mini-batch 8)``, ``... x Matryoshka [384, 128]`` for the run's first line."""
    if teacher is not None:
        return describe_teacher_loss(teacher.config, teacher.temperature)
    text = f"cached MNRL (mini-batch {mini_batch_size})" if config.cached else "MNRL"
    return text + (f" x Matryoshka {list(config.matryoshka_dims)}" if config.matryoshka_dims else "")


STUDENT_TEMPERATURE = 0.05  # MNRL's scale 20: the student's softmax in every distillation loss


class DistillationLoss(torch.nn.Module):
    """A distillation loss plus ``weight`` x MultipleNegativesRankingLoss, on one embedding of the batch.

    ``labels`` are the teacher's scores, ``(batch, 1 + negatives)`` with the positive first
    (:func:`finetune.qlora.teacher.teacher_labels`), or for :class:`InBatchKL` each row's indices into the
    teacher's embeddings; MNRL ignores them and uses the rest of the batch too.

    Args:
        model: The student ``SentenceTransformer``.
        distill: ``DistillKLDivLoss``, ``MarginMSELoss`` or :class:`InBatchKL` over the student's cosine scores.
        weight: MNRL's weight (0: distillation alone).
        scale: Multiplies the distillation loss (``DistillKLDivLoss`` multiplies its KL by the student temperature
            squared, 0.0025 at MNRL's 0.05; 400 undoes it, so ``weight`` weighs two cross-entropies alike).
    """

    def __init__(self, model, distill, weight: float = 0.0, scale: float = 1.0):
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        super().__init__()
        self.model, self.distill, self.weight, self.scale = model, distill, weight, scale
        self.mnrl = MultipleNegativesRankingLoss(model) if weight else None

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)
        loss = self.scale * self.distill.compute_loss_from_embeddings(embeddings, labels)
        if self.mnrl is not None:
            loss = loss + self.weight * self.mnrl.compute_loss_from_embeddings(embeddings, labels)
        return loss


class InBatchKL:
    """KL divergence from the teacher's softmax over every document of the batch to the student's: the
    ``distill`` part of :class:`DistillationLoss` for ``teacher.loss: in_batch_kl``.

    MNRL scores each query against every positive and negative of the batch and asks for its own positive;
    this asks for the teacher's whole distribution over the same candidates (as TAS-B distils in-batch
    negatives), so each query learns from 64 soft targets at batch 32 with one negative, not from 2.

    Args:
        queries: The teacher's query embeddings, normalised: ``labels[:, 0]`` indexes them.
        documents: The teacher's document embeddings: ``labels[:, 1:]`` (positive, negatives) index them.
        temperature: The teacher's softmax temperature over its scores (dot products of the tables); the
            student's is :data:`STUDENT_TEMPERATURE`.

    Example::
        >>> import torch
        >>> from finetune.qlora.losses import InBatchKL
        >>> kl = InBatchKL.divergence(torch.eye(2) / 0.05, torch.eye(2), temperature=0.05)
        >>> round(float(kl), 6)
        0.0
    """

    def __init__(self, queries: torch.Tensor, documents: torch.Tensor, temperature: float):
        self.queries, self.documents, self.temperature = queries, documents, temperature

    @staticmethod
    def divergence(student_logits: torch.Tensor, teacher_scores: torch.Tensor, temperature: float) -> torch.Tensor:
        """Mean over queries of KL(teacher softmax || student softmax), rows are queries."""
        teacher = torch.log_softmax(teacher_scores / temperature, dim=1)
        student = torch.log_softmax(student_logits, dim=1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.util import cos_sim

        candidates = torch.cat(embeddings[1:])  # every positive, then every first negative, ...: MNRL's order
        student = cos_sim(embeddings[0], candidates) / STUDENT_TEMPERATURE
        index = labels.long().cpu()  # only the batch's rows of the tables move to the device
        teacher_queries = self.queries[index[:, 0]]
        teacher_documents = self.documents[index[:, 1:].T.reshape(-1)]  # the same order as ``candidates``
        teacher = (teacher_queries @ teacher_documents.T).to(student.device)
        return self.divergence(student, teacher, self.temperature)


def distillation_loss(model, teacher, temperature: float | None, embeddings=None) -> DistillationLoss:
    """The recipe's ``teacher.loss`` over the student's cosine scores, with MNRL at ``teacher.mnrl_weight``.

    Args:
        model: The student.
        teacher: The recipe's ``teacher`` section.
        temperature: The teacher's softmax temperature (``kl_div``, ``in_batch_kl``); the student's is
            :data:`STUDENT_TEMPERATURE`.
        embeddings: ``in_batch_kl``: the teacher's (queries, documents) tables the labels index.
    """
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim

    if teacher.loss == "in_batch_kl":
        return DistillationLoss(model, InBatchKL(*embeddings, temperature), teacher.mnrl_weight)
    if teacher.loss == "kl_div":
        distill = DistillKLDivLoss(
            model, pairwise_cos_sim, student_temperature=STUDENT_TEMPERATURE, teacher_temperature=temperature
        )
        return DistillationLoss(model, distill, teacher.mnrl_weight, scale=1 / STUDENT_TEMPERATURE**2)
    return DistillationLoss(model, MarginMSELoss(model, pairwise_cos_sim), teacher.mnrl_weight)


def describe_teacher_loss(teacher, temperature: float | None) -> str:
    """``DistillKLDiv (teacher temperature 0.05) + 0.5 x MNRL`` for the run's first line."""
    names = {"kl_div": "DistillKLDiv", "in_batch_kl": "in-batch KL", "margin_mse": "MarginMSE"}
    text = names[teacher.loss] + (f" (teacher temperature {temperature:g})" if temperature is not None else "")
    return text + (f" + {teacher.mnrl_weight:g} x MNRL" if teacher.mnrl_weight else "")
