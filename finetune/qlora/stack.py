"""The checkpoint's own module stack, made trainable, and the check that it is still the checkpoint.

A sentence-transformers checkpoint is more than its transformer: ``modules.json`` lists the
Pooling mode (cls, mean, lasttoken, ...), Dense heads, Normalize, and the config holds prompts.
Fine-tuning must keep all of it, or the "base" score and the exported model describe another
model. :func:`load_stack` loads exactly what ``SentenceTransformer(path)`` loads (the transformer
quantised or in 16-bit when asked), replaces the pooling only when the recipe names another mode,
and freezes everything after the transformer unless ``lora.train_head`` is set.
:func:`check_fidelity` then proves, before training, that the stack the recipe built computes the
same embeddings as plain ``SentenceTransformer(path)``, and names the first module that does not.
"""

from __future__ import annotations

import logging

import torch

from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

FIDELITY_MIN_COSINE = 0.9999
# pooling modes that read the attention mask to skip padding (all but cls)
_MASKED_POOLING = ("mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def pooling_index(model) -> int | None:
    """Position of the Pooling module in ``model``, or ``None``."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    return next((i for i, m in enumerate(model.children()) if isinstance(m, Pooling)), None)


def pooling_mode(model) -> str | None:
    """The pooling mode of ``model`` (``cls``, ``mean``, ``lasttoken``, ...), or ``None`` without a Pooling module."""
    i = pooling_index(model)
    if i is None:
        return None
    mode = model[i].pooling_mode
    return mode if isinstance(mode, str) else "+".join(mode)


def override_pooling(model, mode: str) -> str | None:
    """Replace the checkpoint's pooling by ``mode``; returns the checkpoint's mode when it differed."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    i = pooling_index(model)
    saved = pooling_mode(model)
    if saved == mode:
        return None
    pooling = Pooling(model[0].get_embedding_dimension(), pooling_mode=mode)
    if i is None:
        raise FinetuneError(
            f"the checkpoint has no Pooling module to set to '{mode}'; use pooling=auto", where="recipe: pooling"
        )
    model._modules[str(i)] = pooling
    return saved


def head_modules(model) -> list[torch.nn.Module]:
    """The modules after the transformer that hold weights (Dense, LayerNorm, ...)."""
    return [m for m in list(model.children())[1:] if any(True for _ in m.parameters())]


def set_head_trainable(model, trainable: bool) -> int:
    """Freeze (default) or train the head; returns how many head parameters train."""
    count = 0
    for module in head_modules(model):
        for p in module.parameters():
            p.requires_grad_(trainable)
            count += p.numel() if trainable else 0
    return count


def check_pooling_inputs(model, sample: list[str]) -> None:
    """Pooling that skips padding needs an attention mask from the tokenizer; say so before training."""
    mode = pooling_mode(model)
    if mode is None or not any(m in mode.split("+") for m in _MASKED_POOLING):
        return
    features = model.preprocess(sample[:2] or ["a", "ab"])
    if "attention_mask" not in features:
        raise FinetuneError(
            f"pooling '{mode}' needs the tokenizer's attention_mask, and this checkpoint's tokenizer returns none; "
            "use pooling=cls",
            where="recipe: pooling",
        )


@torch.no_grad()
def embed(model, queries: list[str], documents: list[str]) -> torch.Tensor:
    """``encode_query(queries)`` stacked over ``encode_document(documents)``, prompts applied; float32 on CPU."""
    parts = [
        encode(texts, convert_to_tensor=True, batch_size=16).float().cpu()
        for texts, encode in ((queries, model.encode_query), (documents, model.encode_document))
        if texts
    ]
    return torch.cat(parts)


def cosine_to(reference, model, queries: list[str], documents: list[str]) -> torch.Tensor:
    """Row-wise cosine between ``model``'s and ``reference``'s embeddings of the same texts (prompts applied)."""
    ours, theirs = embed(model, queries, documents), embed(reference, queries, documents)
    return torch.nn.functional.cosine_similarity(ours, theirs)


@torch.no_grad()
def first_difference(built, reference, texts: list[str], stop_at: int | None = None) -> str | None:
    """Run the same features through both stacks module by module; describe the first output that differs."""
    features_a = built.preprocess(texts)
    features_b = reference.preprocess(texts)
    names_a = [type(m).__name__ for m in built.children()]
    names_b = [type(m).__name__ for m in reference.children()]
    if names_a != names_b:
        return f"the module stacks differ: {' -> '.join(names_a)} vs the checkpoint's {' -> '.join(names_b)}"
    a, b = dict(features_a), dict(features_b)
    for i, (ma, mb) in enumerate(zip(built.children(), reference.children())):
        if stop_at is not None and i >= stop_at:
            return None
        a, b = ma(a), mb(b)
        key = "sentence_embedding" if "sentence_embedding" in b else "token_embeddings"
        x, y = a.get(key), b.get(key)
        if x is None or x.shape != y.shape or not torch.allclose(x.float(), y.float(), atol=1e-4, rtol=1e-3):
            return f"module {i} ({names_a[i]}) gives other outputs than the checkpoint's"
    return None


def check_fidelity(
    built, reference, queries: list[str], documents: list[str], pooling_overridden: bool = False
) -> dict:
    """The stack the recipe built must embed like plain ``SentenceTransformer(path)`` (cosine >= 0.9999).

    Args:
        built: The recipe's unquantised stack (before LoRA).
        reference: ``SentenceTransformer(path)`` with the run's prompts.
        queries, documents: A sample of the run's own texts.
        pooling_overridden: The recipe chose another pooling; compare the modules before it only.

    Returns:
        ``{"min_cosine", "texts", "compared"}`` for metrics.json.

    Raises:
        FinetuneError: naming the first module whose output differs.
    """
    if pooling_overridden:
        stop = pooling_index(reference)
        problem = first_difference(built, reference, (queries + documents)[:8], stop_at=stop)
        if problem:
            raise FinetuneError(f"{problem}; the recipe's model is not the checkpoint", where="fidelity check")
        return {
            "min_cosine": None,
            "texts": len(queries) + len(documents),
            "compared": "modules before the overridden pooling",
        }
    cos = cosine_to(reference, built, queries, documents)
    if float(cos.min()) < FIDELITY_MIN_COSINE:
        problem = (
            first_difference(built, reference, (queries + documents)[:8])
            or "the embeddings differ, but no single module does"
        )
        raise FinetuneError(
            f"{problem} (min cosine {float(cos.min()):.6f} < {FIDELITY_MIN_COSINE})", where="fidelity check"
        )
    return {"min_cosine": float(cos.min()), "texts": len(cos), "compared": "embeddings, prompts applied"}
