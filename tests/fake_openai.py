"""A small OpenAI-compatible server on 127.0.0.1 for tests: chat completions and embeddings.

It answers the way real servers misbehave, steered by markers in the passage it is asked about:
``[429]`` and ``[500]`` fail the first request for that passage, ``[slow]`` answers the first
request after the client's timeout, ``[garbled]`` answers prose with no questions first,
``[fenced]`` wraps the JSON in a code fence and chatter, ``[never]`` always fails with 500.
Questions are made from the passage's words. Embeddings hash character trigrams into
``dimensions`` buckets (so similar texts get similar vectors); the first embeddings request can
be made to fail with 429. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, slow_seconds: float = 1.0, embedding_429_first: bool = False, delay: float = 0.0):
        self.requests: list[dict] = []  # {"path", "passage", "status", "auth"}
        self.slow_seconds, self.embedding_429_first, self.delay = slow_seconds, embedding_429_first, delay
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer, headers = server.answer(self.path, body, self.headers.get("Authorization"))
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, key: str) -> int:
        with self._lock:
            self._seen[key] = self._seen.get(key, 0) + 1
            return self._seen[key]

    def answer(self, path: str, body: dict, auth: str | None):
        if self.delay:
            time.sleep(self.delay)
        if path.endswith("/embeddings"):
            return self._embeddings(body, auth)
        passage = (
            body["messages"][-1]["content"].split('"""')[-2]
            if '"""' in body["messages"][-1]["content"]
            else body["messages"][-1]["content"]
        )
        n = int(re.search(r"Write (\d+) different questions", body["messages"][-1]["content"]).group(1))
        attempt = self.count(passage)
        status = 200
        if "[never]" in passage or (attempt == 1 and "[500]" in passage):
            status = 500
        elif attempt == 1 and "[429]" in passage:
            status = 429
        self.requests.append({"path": path, "passage": passage.strip(), "status": status, "auth": auth})
        if status != 200:
            return status, {"error": {"message": "try later"}}, {"Retry-After": "0"} if status == 429 else {}
        if attempt == 1 and "[slow]" in passage:
            time.sleep(self.slow_seconds)
        if attempt == 1 and "[garbled]" in passage:
            return 200, _chat("I am sorry, as a language model I would rather talk about the weather."), {}
        questions = _questions(passage, n)
        content = json.dumps(questions)
        if "[fenced]" in passage:
            content = f"Sure! Here are the questions:\n```json\n{content}\n```\nHope this helps."
        return 200, _chat(content), {}

    def _embeddings(self, body: dict, auth: str | None):
        attempt = self.count("__embeddings__")
        status = 429 if attempt == 1 and self.embedding_429_first else 200
        self.requests.append(
            {"path": "/v1/embeddings", "passage": None, "status": status, "auth": auth, "n": len(body["input"])}
        )
        if status != 200:
            return status, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        dims = body.get("dimensions") or 48
        data = [{"object": "embedding", "index": i, "embedding": embed(t, dims)} for i, t in enumerate(body["input"])]
        return 200, {"object": "list", "data": list(reversed(data)), "model": body["model"]}, {}


def embed(text: str, dims: int) -> list[float]:
    vec = [0.0] * dims
    t = f"  {text.lower()}  "
    for i in range(len(t) - 2):
        vec[int(hashlib.md5(t[i : i + 3].encode()).hexdigest(), 16) % dims] += 1.0
    return vec


def _questions(passage: str, n: int) -> list[str]:
    words = [w for w in re.findall(r"[a-zA-Z]{4,}|\d+", passage) if w.lower() not in {"that", "this", "with", "from"}]
    key = words[:3] or ["thing"]  # the passage's first words (its heading) make its questions its own
    out = []
    for i in range(n):
        w = words[(i * 2) % len(words)] if words else "it"
        out.append(f"what about {w.lower()} and {' '.join(key).lower()} variant {i}?")
    out.append(out[0])  # a duplicate, which must be dropped
    return out


def _chat(content: str) -> dict:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
