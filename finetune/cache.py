"""On-disk embedding cache: encode a list of texts once per model and settings, reuse it after.

An entry's key hashes the model's identity (its folder's files), the texts in order, the task
(query/document), prompt, max sequence length and normalisation, so a change to any of them is a
miss. Entries are safetensors files written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from finetune.atomic import save_tensors
from finetune.stages import stage

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune/embeddings")).expanduser()


class EmbeddingCache:
    """Encode texts with a SentenceTransformer, or load the embeddings from an earlier run.

    Args:
        directory: Where entries live; ``None`` uses ``$FINETUNE_CACHE`` or ``~/.cache/finetune/embeddings``.
        enabled: When false, always encode and never write.
        force: Recompute (and overwrite) every entry this cache is asked for (``--force-recache``).

    Example (not run: it needs a model, data or a server)::
        cache = EmbeddingCache("/tmp/emb")
        docs = cache.encode(model, identity, corpus_texts, task="document")
        cache.hits, cache.misses
        (0, 1)
    """

    def __init__(self, directory: str | Path | None = None, enabled: bool = True, force: bool = False):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.enabled = enabled
        self.force = force
        self.hits = 0
        self.misses = 0

    def key(self, model, identity: str, texts: Sequence[str], task: str, prompt: str | None, normalize: bool) -> str:
        """The entry name for these texts under this model and these settings."""
        h = hashlib.sha256()
        settings = {
            "identity": identity,
            "task": task,
            "prompt": prompt,
            "model_prompts": getattr(model, "prompts", {}),
            "max_seq_length": getattr(model, "max_seq_length", None),
            "normalize": normalize,
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        for text in texts:
            h.update(text.encode())
            h.update(b"\0")
        return h.hexdigest()

    def encode(
        self,
        model,
        identity: str,
        texts: Sequence[str],
        task: str = "document",
        prompt: str | None = None,
        batch_size: int = 64,
        normalize: bool = True,
        devices: list[str] | None = None,
    ) -> torch.Tensor:
        """Embeddings of ``texts`` as a float32 CPU tensor ``[len(texts), dim]``.

        Args:
            model: A ``SentenceTransformer``.
            identity: A string that identifies the model's weights (:func:`finetune.models.model_identity`).
            texts: What to encode.
            task: ``query`` or ``document``; selects ``encode_query``/``encode_document``.
            prompt: A prompt prepended to each text, if any.
            batch_size: Encoding batch size.
            normalize: L2-normalise the embeddings.
            devices: Encode in one process per device (sentence-transformers' multi-process pool).
        """
        with stage("encoding"):
            return self._encode(model, identity, texts, task, prompt, batch_size, normalize, devices)

    def _encode(self, model, identity, texts, task, prompt, batch_size, normalize, devices) -> torch.Tensor:
        path = self.directory / f"{self.key(model, identity, texts, task, prompt, normalize)}.safetensors"
        if self.enabled and not self.force and path.is_file():
            from safetensors.torch import load_file

            self.hits += 1
            logger.info("cache hit: %d %s embeddings from %s", len(texts), task, path)
            return load_file(str(path))["embeddings"]
        self.misses += 1
        encode = model.encode_query if task == "query" else model.encode_document
        embeddings = encode(
            list(texts),
            prompt=prompt,
            batch_size=batch_size,
            normalize_embeddings=normalize,
            convert_to_tensor=True,
            show_progress_bar=len(texts) > batch_size,
            **({"device": list(devices)} if devices else {}),
        )
        embeddings = embeddings.float().cpu().clone()  # a normal tensor, not an inference-mode one
        if self.enabled:
            save_tensors(path, {"embeddings": embeddings}, metadata={"task": task, "count": str(len(texts))})
            logger.info("cached %d %s embeddings at %s", len(texts), task, path)
        return embeddings
