"""Ask an OpenAI-compatible chat endpoint for the questions each chunk answers; write training pairs.

Chunks are sent ``concurrency`` at a time. Each finished chunk is appended to a resume file
(``<out>.progress.jsonl``, flushed and fsynced) before the next is counted, so a run that is
killed and started again skips every chunk that finished and asks for none twice. The pairs file
is written at the end (atomically), from the resume file, with duplicate questions removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from finetune.atomic import write_text
from finetune.errors import FinetuneError
from finetune.openai_client import OpenAIClient
from finetune.synth.chunking import Chunk
from finetune.synth.questions import keep, load_template, normalise, parse_questions, render

logger = logging.getLogger(__name__)


@dataclass
class SynthSettings:
    """What is asked of the LLM. A resume file only continues a run with the same settings."""

    model: str = "gpt-4o-mini"
    base_url: str = "https://api.openai.com/v1"
    per_chunk: int = 10
    temperature: float = 0.7
    prompt: str | None = None  # template file; None = the packaged one
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 5
    parse_retries: int = 2  # extra requests when an answer holds no parsable questions


@dataclass
class SynthReport:
    """What a run did: chunks finished before and now, failures, questions written and dropped."""

    chunks: int = 0
    done_before: int = 0
    done_now: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    retries: int = 0


def progress_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".progress.jsonl")


def synthesize(
    chunks: list[Chunk], out: str | Path, settings: SynthSettings, show_progress: bool = True
) -> SynthReport:
    """Generate questions for ``chunks`` and write ``out`` as JSONL rows ``{query, positive, chunk_id, source}``.

    Args:
        chunks: Passages (see :func:`finetune.synth.chunking.load_chunks`).
        out: The pairs file; the recipes read it with ``data=<out>``.
        settings: Endpoint, model, questions per chunk, concurrency, retries.
        show_progress: Show a progress bar.

    Returns:
        A :class:`SynthReport`. Chunks that failed after every retry are listed in ``failed``;
        running again retries only those.

    Example (not run: it needs a model, data or a server)::
        settings = SynthSettings(base_url="http://127.0.0.1:11434/v1", model="llama3.2")
        report = synthesize(load_chunks("docs/"), "pairs.jsonl", settings)
    """
    template = load_template(settings.prompt)
    header = _header(settings, template)
    resume = progress_path(out)
    finished, wanted = _still_current(resume, header, chunks)
    pending = [c for c in chunks if c.id not in finished]
    report = SynthReport(chunks=len(chunks), done_before=len(finished))
    client = OpenAIClient(settings.base_url, settings.api_key_env, settings.timeout, settings.max_retries)

    with resume.open("a", encoding="utf-8") as log, ThreadPoolExecutor(max(1, settings.concurrency)) as pool:
        if log.tell() == 0:
            _append(log, {"settings": header})
        bar = tqdm(total=len(chunks), initial=len(finished), unit="chunk", desc="synth", disable=not show_progress)
        futures = {pool.submit(_ask, client, template, chunk, settings): chunk for chunk in pending}
        try:
            for future in as_completed(futures):
                chunk = futures[future]
                try:
                    questions, dropped = future.result()
                except FinetuneError as exc:
                    report.failed[chunk.id] = str(exc)
                    logger.warning("chunk %s failed: %s", chunk.id, exc)
                    continue
                finally:
                    bar.update(1)
                record = {"chunk": chunk.id, "hash": wanted[chunk.id], "questions": questions, "dropped": dropped}
                _append(log, record)
                finished[chunk.id] = record
                report.done_now += 1
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()
    report.retries = client.retries
    report.pairs, report.dropped = _write_pairs(chunks, finished, Path(out))
    return report


def _header(settings: SynthSettings, template: str) -> dict:
    """What a progress file was written under; a file with another header is not resumed."""
    return {
        "model": settings.model,
        "base_url": settings.base_url,
        "per_chunk": settings.per_chunk,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
    }


def _still_current(resume: Path, header: dict, chunks: list[Chunk]) -> tuple[dict, dict]:
    """The finished chunks of the progress file whose text is unchanged, and every chunk's text digest."""
    wanted = {c.id: _digest(c.text) for c in chunks}
    finished = _read_progress(resume, header)
    return {cid: rec for cid, rec in finished.items() if wanted.get(cid) == rec["hash"]}, wanted


def _ask(
    client: OpenAIClient, template: str, chunk: Chunk, settings: SynthSettings
) -> tuple[list[str], dict[str, int]]:
    """One chunk's kept questions and the count of dropped ones by reason."""
    payload = {
        "model": settings.model,
        "messages": [{"role": "user", "content": render(template, chunk.text, settings.per_chunk)}],
        "temperature": settings.temperature,
    }
    for _ in range(settings.parse_retries + 1):
        answer = client.post("chat/completions", payload)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        questions = parse_questions(content) if isinstance(content, str) else None
        if questions:
            break
    else:
        raise FinetuneError(
            f"no parsable questions in {settings.parse_retries + 1} answers; check the model and the prompt template",
            where=f"chunk {chunk.id}",
        )
    kept, dropped, seen = [], {}, set()
    for q in questions:
        reason = keep(q, chunk.text) or ("duplicate" if normalise(q) in seen else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        seen.add(normalise(q))
        kept.append(q)
    return kept[: settings.per_chunk], dropped


def _write_pairs(chunks: list[Chunk], finished: dict[str, dict], out: Path) -> tuple[int, dict[str, int]]:
    rows, seen, dropped = [], set(), {}
    for chunk in chunks:
        record = finished.get(chunk.id)
        if record is None:
            continue
        for reason, n in record.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + n
        for q in record["questions"]:
            key = normalise(q)
            if key in seen:  # the same question for two chunks would teach two answers
                dropped["duplicate"] = dropped.get("duplicate", 0) + 1
                continue
            seen.add(key)
            rows.append({"query": q, "positive": chunk.text, "chunk_id": chunk.id, "source": chunk.source})
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows), dropped


def _read_progress(path: Path, header: dict) -> dict[str, dict]:
    """Finished chunks from an earlier run; a line cut short by a kill is dropped (and truncated away)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # torn last line: cut it so the next append starts on a fresh line
        with path.open("r+b") as f:
            f.truncate(end)
    records = []
    for line in raw[:end].decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a damaged line", path)
    if records and "settings" in records[0]:
        before = records.pop(0)["settings"]
        changed = [k for k in header if before.get(k) != header[k]]
        if changed:
            k = changed[0]
            raise FinetuneError(
                f"was started with other settings ({k} {before.get(k)!r}, now {header[k]!r}); use the same settings "
                "to resume, or delete it to start over",
                where=str(path),
            )
    return {r["chunk"]: r for r in records if "chunk" in r}


def _append(log, record: dict) -> None:
    log.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.flush()
    os.fsync(log.fileno())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(report: SynthReport) -> str:
    """One paragraph for the terminal."""
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(report.dropped.items())) or "none"
    return (
        f"{report.chunks} chunks: {report.done_before} done earlier, {report.done_now} now, {len(report.failed)} "
        "failed; "
        f"{report.pairs} pairs written; dropped questions: {dropped}; {report.retries} retried request(s)"
    )
