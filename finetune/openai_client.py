"""A small client for OpenAI-compatible HTTP endpoints (vLLM, llama.cpp, Ollama, hosted APIs).

JSON in, JSON out, with retries: 408/409/425/429 and 5xx answers, timeouts, dropped connections
and bodies that are not JSON are retried with exponential backoff and jitter (a ``Retry-After``
header is honoured); other answers (401, 404, 400, ...) fail at once with one line naming the
endpoint. The API key is read from an environment variable, sent only in the ``Authorization``
header, and never logged or put in an error message. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request

from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

RETRYABLE = {408, 409, 425, 429}


class OpenAIClient:
    """POST JSON to ``<base_url>/<path>`` with retries.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: Environment variable holding the key; unset or empty sends no key (local servers).
        timeout: Seconds to wait for one answer.
        max_retries: Retries after the first attempt.
        backoff: First retry delay in seconds; doubles each retry (with jitter), capped at ``max_backoff``.
        max_backoff: Longest delay between two attempts.

    Example (not run: it needs a model, data or a server)::
        client = OpenAIClient("http://127.0.0.1:8000/v1")
        client.post("embeddings", {"model": "m", "input": ["hello"]})["data"][0]["embedding"][:2]
        [0.01, -0.2]
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self._lock = threading.Lock()
        self.retries = 0  # total retries made, for reports and tests

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIClient({self.base_url!r}, key={'set' if self._key else 'none'})"

    def post(self, path: str, payload: dict) -> dict:
        """The decoded JSON answer of ``POST base_url/path``; raises :class:`FinetuneError` when retries run out."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    last = f"answer is not JSON ({raw[:80]!r})"
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode(errors="replace").replace("\n", " ")
                last = f"HTTP {exc.code} {detail}".strip()
                if exc.code not in RETRYABLE and exc.code < 500:
                    raise FinetuneError(f"{last}; check the model name, base URL and key", where=url) from None
                wait = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt == self.max_retries:
                break
            delay = (
                min(self.max_backoff, wait)
                if wait is not None
                else min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
            )
            with self._lock:
                self.retries += 1
            logger.info("%s: %s; retry %d/%d in %.2f s", url, last, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise FinetuneError(
            f"no usable answer after {self.max_retries + 1} attempts (last: {last}); is the server up?", where=url
        )


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
