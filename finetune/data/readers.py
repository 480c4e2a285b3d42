"""Read rows from JSONL, JSON, CSV and Parquet files, with errors that name the file and line.

Text files are decoded as UTF-8 (a leading byte-order mark is dropped); bytes that are not UTF-8
are refused in one line naming the file and line, not a ``UnicodeDecodeError`` from the middle of a read.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a table of rows from ``path``; the format follows the file extension.

    Args:
        path: A ``.jsonl``, ``.json`` (a list of objects), ``.csv``/``.tsv`` or ``.parquet`` file.

    Returns:
        One dict per row.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError("file not found; check data.path", where=str(path))
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise FinetuneError(f"unknown file type '{suffix}'; use one of {', '.join(FORMATS)}", where=str(path))
    if path.stat().st_size == 0:
        raise FinetuneError("file is empty", where=str(path))
    if suffix == ".jsonl":
        rows = list(iter_jsonl(path))
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".csv", ".tsv"):
        text = io.StringIO(read_text(path), newline="")
        rows = list(csv.DictReader(text, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise FinetuneError(f"not a readable Parquet file ({exc})", where=str(path)) from None
    if not rows:
        raise FinetuneError("file has no rows", where=str(path))
    return rows


def not_utf8(path: Path, lineno: int, byte: int, column: int) -> FinetuneError:
    """The one-line refusal of a line that is not UTF-8: the first bad ``byte`` is at ``column`` (from 1)."""
    return FinetuneError(
        f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8", where=f"{path} line {lineno}"
    )


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Each line of a UTF-8 text file with its number (from 1), read one line at a time.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "bad.jsonl"
        >>> _ = p.write_bytes(b'{"a": 1}\\n{"a": "caf\\xe9"}\\n')
        >>> [n for n, _ in text_lines(p)]  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        finetune.errors.FinetuneError: ...bad.jsonl line 2: not UTF-8 text (byte 0xe9 at column 11); save the file ...
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(path, lineno, raw[exc.start], exc.start + 1) from None


def read_text(path: Path) -> str:
    """The whole of a UTF-8 text file; bytes that are not UTF-8 are an error naming their line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise not_utf8(path, raw.count(b"\n", 0, exc.start) + 1, raw[exc.start], exc.start - line_start + 1) from None


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield JSON objects, one per non-blank line; a malformed line is an error naming its number."""
    for _, row in numbered_jsonl(path):
        yield row


def numbered_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for each non-blank line of ``path``."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(
                f"malformed JSON ({exc.msg}); fix or delete that line", where=f"{path} line {lineno}"
            ) from None
        if not isinstance(row, dict):
            raise FinetuneError("each line must be a JSON object", where=f"{path} line {lineno}")
        yield lineno, row


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"malformed JSON ({exc.msg})", where=f"{path} line {exc.lineno}") from None
    if isinstance(data, dict):  # {"data": [...]} and similar single-key wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FinetuneError("expected a JSON list of objects", where=str(path))
    return data
