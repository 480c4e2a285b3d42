"""The prompt that asks for questions, and robust parsing of what the LLM answers.

The template is a text file with ``{chunk}`` and ``{n}`` placeholders (replaced literally, so a
JSON example with braces in the template needs no escaping). The answer may be a JSON list, a
JSON object holding a list, either inside a Markdown code fence or surrounded by prose, or, as a
last resort, a numbered or bulleted list of lines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.errors import FinetuneError

DEFAULT_TEMPLATE = Path(__file__).with_name("prompt.txt")
COPY_WORDS = 8  # a question sharing this many consecutive words with its chunk copies it


def load_template(path: str | Path | None = None) -> str:
    """The prompt template (the packaged one when ``path`` is None); it must contain ``{chunk}``."""
    path = Path(path) if path else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FinetuneError("prompt template not found", where=str(path))
    text = path.read_text(encoding="utf-8")
    if "{chunk}" not in text:
        raise FinetuneError("the template has no {chunk} placeholder; add one where the passage goes", where=str(path))
    return text


def render(template: str, chunk: str, n: int) -> str:
    return template.replace("{n}", str(n)).replace("{chunk}", chunk)


def parse_questions(answer: str) -> list[str] | None:
    """The questions in an LLM answer, or ``None`` when none can be found.

    Example:
        >>> parse_questions('Sure!\\n```json\\n{"questions": ["Where is it?", "When?"]}\\n```')
        ['Where is it?', 'When?']
    """
    text = re.sub(r"```(?:json|JSON)?", "", answer or "").strip()
    for candidate in (text, _bracketed(text, "[", "]"), _bracketed(text, "{", "}")):
        if not candidate:
            continue
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            lists = [v for v in value.values() if isinstance(v, list)]
            value = lists[0] if lists else None
        if isinstance(value, list):
            found = [_as_text(v) for v in value]
            found = [q for q in found if q]
            if found:
                return found
    lines = [re.sub(r"^\s*(?:\d+[.)]|[-*•])\s+", "", line).strip() for line in text.splitlines()]
    listed = [line.strip('"') for line in lines if line.endswith("?") and len(line) > 3]
    return listed or None


def _bracketed(text: str, open_: str, close: str) -> str | None:
    start, end = text.find(open_), text.rfind(close)
    return text[start : end + 1] if 0 <= start < end else None


def _as_text(value) -> str:
    if isinstance(value, dict):  # [{"question": "..."}]
        value = next((v for v in value.values() if isinstance(v, str)), "")
    return " ".join(str(value).split()) if isinstance(value, (str, int, float)) else ""


def normalise(question: str) -> str:
    """The form duplicates are detected on: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def keep(question: str, chunk: str, min_chars: int = 8, max_chars: int = 400) -> str | None:
    """Why ``question`` is dropped (too short/long, or copies a run of words from the chunk), or ``None`` to keep
    it.
    """
    if not min_chars <= len(question) <= max_chars:
        return "length"
    words, chunk_norm = normalise(question).split(), f" {normalise(chunk)} "
    for i in range(len(words) - COPY_WORDS + 1):
        if f" {' '.join(words[i : i + COPY_WORDS])} " in chunk_norm:
            return "copied"
    return None
