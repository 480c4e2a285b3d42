"""Split plain-text and Markdown documents into overlapping chunks of about ``size`` characters.

Splits fall on the largest boundary that fits: Markdown headings, then blank lines (paragraphs),
then line breaks, then sentence ends, then spaces. Pieces are packed greedily up to ``size``; the
next chunk starts with the last pieces of the previous one, up to ``overlap`` characters, so a
fact cut at a boundary appears whole in one of the two chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.data.readers import iter_jsonl
from finetune.errors import FinetuneError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
# boundaries from coarse to fine; each keeps its separator on the left piece
SEPARATORS = [r"\n(?=#{1,6} )", r"\n\s*\n", r"\n", r"(?<=[.!?])\s+", r" "]


@dataclass(frozen=True)
class Chunk:
    """One passage: a stable id (``file#n`` or the JSONL row's id), its text, and its source file."""

    id: str
    text: str
    source: str


def split_text(text: str, size: int = 1500, overlap: int = 200) -> list[str]:
    """Chunks of at most ``size`` characters (a single word longer than that is cut).

    Example:
        >>> split_text("# A\\nfirst part.\\n\\n# B\\nsecond part.", size=20, overlap=0)
        ['# A\\nfirst part.', '# B\\nsecond part.']
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    pieces = _pieces(text.strip(), size, 0)
    chunks, current = [], []
    for piece in pieces:
        if current and sum(map(len, current)) + len(piece) > size:
            chunks.append("".join(current).strip())
            carried = []
            for prev in reversed(current):  # the tail of the last chunk, up to `overlap` characters
                if sum(map(len, carried)) + len(prev) > overlap:
                    break
                carried.insert(0, prev)
            current = carried if sum(map(len, carried)) + len(piece) <= size else []
        current.append(piece)
    if current:
        chunks.append("".join(current).strip())
    return [c for c in chunks if c]


def _pieces(text: str, size: int, level: int) -> list[str]:
    if len(text) <= size:
        return [text] if text else []
    if level == len(SEPARATORS):
        return [text[i : i + size] for i in range(0, len(text), size)]
    parts = [p for p in re.split(f"({SEPARATORS[level]})", text) if p]
    # glue each separator back onto the piece before it
    glued: list[str] = []
    for part in parts:
        if glued and re.fullmatch(SEPARATORS[level], part):
            glued[-1] += part
        else:
            glued.append(part)
    out = []
    for part in glued:
        out.extend([part] if len(part) <= size else _pieces(part, size, level + 1))
    return out


def load_chunks(path: str | Path, size: int = 1500, overlap: int = 200) -> list[Chunk]:
    """Chunks from a JSONL file (one ``{"text": ..., "id": ...}`` per line, used as they are) or
    from a text/Markdown file or a folder of them (split with :func:`split_text`).
    """
    path = Path(path)
    if not path.exists():
        raise FinetuneError("not found; pass a chunks .jsonl, a .txt/.md file, or a folder of them", where=str(path))
    if path.suffix.lower() == ".jsonl":
        chunks, seen = [], set()
        for n, row in enumerate(iter_jsonl(path), 1):
            text = str(row.get("text") or "").strip()
            if not text:
                raise FinetuneError("row has no 'text'", where=f"{path} line {n}")
            cid = str(row.get("id") or row.get("_id") or f"{path.name}#{n}")
            if cid in seen:
                raise FinetuneError(f"duplicate id '{cid}'; chunk ids must be unique", where=f"{path} line {n}")
            seen.add(cid)
            chunks.append(Chunk(cid, text, str(row.get("source") or path.name)))
        return chunks
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES:
        raise FinetuneError(
            f"unknown file type '{path.suffix}'; use .jsonl chunks or {', '.join(TEXT_SUFFIXES)}", where=str(path)
        )
    chunks = []
    for f in files:
        name = str(f.relative_to(path)) if path.is_dir() else f.name
        for n, text in enumerate(split_text(f.read_text(encoding="utf-8", errors="replace"), size, overlap)):
            chunks.append(Chunk(f"{name}#{n}", text, name))
    if not chunks:
        raise FinetuneError(f"no text found (looked for {', '.join(TEXT_SUFFIXES)} files)", where=str(path))
    return chunks
