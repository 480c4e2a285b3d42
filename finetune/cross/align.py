"""Phase 1, alignment without labels. Tensors in, a projection (or its weight matrix) out.

Two objectives over texts both encoders embed. :func:`score_map` (``scores``) is the closed-form
map under which the small model's index scores each document as the large model would, so the
large model's *ranking* carries over. :func:`align_projection` (``identical_text``, ERA) trains the
projection to map the large model's embedding of a text onto the small model's embedding of that
same text. No relevance label is used, so any unlabelled text (corpus documents, query logs,
:func:`alignment_texts`) can train either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finetune.cross.config import AlignmentConfig
from finetune.errors import FinetuneError
from finetune.synth.chunking import load_chunks


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


@torch.no_grad()
def score_map(
    small_docs: torch.Tensor, large_docs: torch.Tensor, ridge: float, probes: torch.Tensor | None = None
) -> torch.Tensor:
    """The linear map ``W`` that lets the small index rank like the large model, in closed form.

    For a large-model query ``q``, the large model scores the corpus as ``D_l q`` and the small index
    scores a mapped query as ``D_s W q``. ``W`` minimises ``||(D_s W - D_l) Q^T||^2 + ridge ||W||^2``
    over probe queries ``Q``: the squared error of every query-document score. Without probes the
    queries are taken as isotropic, which is plain ridge regression ``min ||D_s W - D_l||^2``. With
    probes the solution of this Sylvester equation comes from two eigendecompositions.

    Args:
        small_docs: ``[N, d_s]`` the corpus (and any alignment texts) embedded by the small model.
        large_docs: ``[N, d_l]`` the same texts embedded by the large model.
        ridge: ``lambda`` > 0.
        probes: ``[n, d_l]`` large-model query embeddings weighting the directions queries use.

    Returns:
        ``[d_s, d_l]``: apply as ``normalize(W @ q_large)``.

    Example:
        >>> d_s = F.normalize(torch.randn(500, 8), dim=-1)
        >>> d_l = d_s @ torch.randn(8, 16)  # a large space the small one can express exactly
        >>> W = score_map(d_s, d_l, ridge=1e-6)
        >>> bool(torch.allclose(d_s @ W, d_l, atol=1e-3))
        True
    """
    a, b = small_docs.double(), large_docs.double()
    gram_values, u = torch.linalg.eigh(a.T @ a)
    if probes is None:
        sigma_values, v = torch.ones(b.shape[1], dtype=a.dtype), torch.eye(b.shape[1], dtype=a.dtype)
    else:
        p = probes.double()
        sigma = p.T @ p * (p.shape[1] / len(p))  # scaled so isotropic queries give the identity
        sigma_values, v = torch.linalg.eigh(sigma)
    rhs = u.T @ (a.T @ b) @ (v * sigma_values)  # U^T A^T B Sigma V, in both eigenbases
    w = u @ (rhs / (gram_values[:, None] * sigma_values[None, :] + ridge)) @ v.T
    return w.to(small_docs.dtype)


def alignment_texts(path: str, banned: set[str]) -> list[str]:
    """Unlabelled texts for alignment from ``path``, chunked like ``synth``, without any ``banned`` text.

    Args:
        path: A .txt/.md file, a folder of them, or a .jsonl with a ``text`` per line.
        banned: Texts never to use (every query's text: test queries must not reach training, and the
            train and val queries come in through ``use_queries`` only).

    Returns:
        The distinct texts, in file order.
    """
    try:
        chunks = load_chunks(path)
    except OSError as exc:
        raise FinetuneError(f"cannot read: {exc.strerror or exc}", where=f"alignment.texts {path}") from None
    except FinetuneError as exc:
        raise FinetuneError(exc.message, where=f"alignment.texts {exc.where or path}") from None
    texts = [t for t in dict.fromkeys(c.text for c in chunks) if t not in banned]
    if not texts:
        raise FinetuneError("holds no text to align on (empty, or only query texts)", where=f"alignment.texts {path}")
    return texts
