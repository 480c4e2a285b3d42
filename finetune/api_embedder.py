"""Embeddings from an OpenAI-compatible ``/embeddings`` endpoint, behind the calls a local model answers.

:class:`ApiEmbedder` has ``encode_query``/``encode_document`` with the keyword arguments the
embedding cache and sentence-transformers' evaluator pass, so a query adapter trains over an API
model exactly as over a local one: the embeddings are fetched once in batches (with the client's
retries) and cached on disk under a key that names the endpoint, model and size.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.openai_client import OpenAIClient


class ApiEmbedder:
    """An embedding model served over HTTP.

    Args:
        config: A :class:`~finetune.config.ModelConfig` with ``provider: openai_compatible``.

    Example (not run: it needs a model, data or a server)::
        embedder = ApiEmbedder(ModelConfig(provider="openai_compatible", name="text-embedding-3-small",
                                           base_url="http://127.0.0.1:8000/v1", dimensions=256))
        embedder.encode_document(["a", "b"]).shape
        torch.Size([2, 256])
    """

    similarity_fn_name = "cosine"
    prompts: dict = {}
    max_seq_length = None

    def __init__(self, config: ModelConfig):
        self.config = config
        self.client = OpenAIClient(
            config.base_url, config.api_key_env, timeout=config.timeout, max_retries=config.max_retries
        )

    def identity(self) -> str:
        """What the embedding cache keys on: endpoint, model and size (never the key)."""
        return f"openai_compatible|{self.client.base_url}|{self.config.name}|{self.config.dimensions}"

    def encode_query(self, sentences, prompt: str | None = None, **kwargs) -> torch.Tensor:
        return self._encode(sentences, prompt, **kwargs)

    def encode_document(self, sentences, prompt: str | None = None, **kwargs) -> torch.Tensor:
        return self._encode(sentences, prompt, **kwargs)

    def _encode(
        self,
        sentences,
        prompt=None,
        batch_size: int = 64,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
        **_,
    ) -> torch.Tensor:
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        texts = [(prompt or "") + t for t in texts]
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="embed (API)", disable=not show_progress_bar):
            batch = texts[start : start + batch_size]
            payload = {"model": self.config.name, "input": batch, "encoding_format": "float"}
            if self.config.dimensions:
                payload["dimensions"] = self.config.dimensions
            out.append(self._vectors(self.client.post("embeddings", payload), len(batch)))
        embeddings = torch.cat(out) if out else torch.empty(0, self.config.dimensions or 0)
        return torch.nn.functional.normalize(embeddings, dim=-1) if normalize_embeddings else embeddings

    def _vectors(self, answer: dict, expected: int) -> torch.Tensor:
        where = f"{self.client.base_url}/embeddings"
        try:
            rows = sorted(answer["data"], key=lambda r: r["index"])
            vectors = torch.tensor([r["embedding"] for r in rows], dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            raise FinetuneError(
                "answer has no data[].embedding lists; is this an OpenAI-compatible embeddings endpoint?", where=where
            ) from None
        if vectors.ndim != 2 or len(vectors) != expected:
            raise FinetuneError(f"asked for {expected} embeddings, got {len(vectors)}", where=where)
        if self.config.dimensions and vectors.shape[1] != self.config.dimensions:
            raise FinetuneError(
                f"asked for {self.config.dimensions}-d embeddings, got {vectors.shape[1]}-d; fix model.dimensions",
                where=where,
            )
        if not torch.isfinite(vectors).all():
            raise FinetuneError("answer holds NaN or infinite values", where=where)
        return vectors
