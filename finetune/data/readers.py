"""Read rows from JSONL, JSON, CSV and Parquet files, with errors that name the file and line."""

from __future__ import annotations

import csv
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
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise FinetuneError(f"not a readable Parquet file ({exc})", where=str(path)) from None
    if not rows:
        raise FinetuneError("file has no rows", where=str(path))
    return rows


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield JSON objects, one per non-blank line; a malformed line is an error naming its number."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
            yield row


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"malformed JSON ({exc.msg})", where=f"{path} line {exc.lineno}") from None
    if isinstance(data, dict):  # {"data": [...]} and similar single-key wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FinetuneError("expected a JSON list of objects", where=str(path))
    return data
