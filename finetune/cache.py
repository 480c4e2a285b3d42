"""On-disk embedding cache: encode a list of texts once per model and settings, reuse it after.

An entry's key hashes the model's identity (its folder's files), the texts in order, the task
(query/document), prompt, max sequence length and normalisation, so a change to any of them is a
miss. Entries are ``.npy`` arrays (no pickle), written chunk by chunk into a memory-mapped file that
is renamed into place when whole, and read back memory-mapped: a corpus of 10^6 passages never
has to sit in memory twice, once as encoder outputs and once as the stacked result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from finetune.atomic import atomic_path
from finetune.stages import stage

logger = logging.getLogger(__name__)


CHUNK = 32_768  # texts encoded per call: bounds the encoder's own buffers whatever the corpus size


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
        path = self.directory / f"{self.key(model, identity, texts, task, prompt, normalize)}.npy"
        if self.enabled and not self.force and path.is_file():
            self.hits += 1
            logger.info("cache hit: %d %s embeddings from %s", len(texts), task, path)
            return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: the file is never changed
        self.misses += 1
        encode = model.encode_query if task == "query" else model.encode_document
        kwargs = dict(prompt=prompt, batch_size=batch_size, normalize_embeddings=normalize)
        if devices:
            kwargs["device"] = list(devices)
        if not self.enabled:
            return torch.from_numpy(encode_in_chunks(encode, texts, kwargs))
        with atomic_path(path) as tmp:
            encode_in_chunks(encode, texts, kwargs, file=tmp).flush()
        logger.info("cached %d %s embeddings at %s", len(texts), task, path)
        return torch.from_numpy(np.load(path, mmap_mode="c"))


def encode_in_chunks(encode, texts: Sequence[str], kwargs: dict, file: Path | None = None, chunk: int = CHUNK):
    """``encode(texts[i:i + chunk], **kwargs)`` for each chunk, written into one float32 array.

    Args:
        encode: ``model.encode_query`` or ``model.encode_document``.
        texts: What to encode.
        kwargs: The encode call's other arguments (prompt, batch size, normalisation).
        file: Write into a memory-mapped ``.npy`` file there (the cache's entry) instead of memory.
        chunk: Texts per call.

    Returns:
        The ``[len(texts), dim]`` array (a memmap when ``file`` is given).
    """
    out = None
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        rows = encode(part, convert_to_numpy=True, show_progress_bar=len(texts) > kwargs["batch_size"], **kwargs)
        rows = np.asarray(rows, dtype=np.float32)
        if out is None:
            shape = (len(texts), rows.shape[1])
            out = (
                np.empty(shape, np.float32)
                if file is None
                else np.lib.format.open_memmap(file, "w+", np.float32, shape)
            )
        out[start : start + len(part)] = rows
    if out is None:
        raise ValueError("no texts to encode")
    return out
