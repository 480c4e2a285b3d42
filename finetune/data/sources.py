"""Data sources: pair files, BEIR folders, Hugging Face datasets and the packaged FAQ.

Each becomes a :class:`~finetune.data.dataset.RetrievalData` through :func:`load_data`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from finetune.config import ColumnsConfig, DataConfig
from finetune.data.dataset import RetrievalData
from finetune.data.readers import iter_jsonl, numbered_jsonl, read_rows, read_text
from finetune.errors import FinetuneError, did_you_mean

FAQ_COLUMNS = ColumnsConfig(query="q", positive="a", id="id", domain="category")


def load_data(config: DataConfig) -> RetrievalData:
    """Load and check the data a recipe names.

    Example:
        >>> data = load_data(DataConfig(type="builtin", name="construction-faq"))
        >>> len(data.queries), len(data.corpus)
        (503, 503)
    """
    if config.type == "builtin":
        data = load_faq()
    elif config.type == "beir":
        data = load_beir(config.path)
    elif config.type == "hf":
        data = load_hf(config)
    else:
        data = pairs_to_data(read_rows(config.path), config.columns, where=config.path)
    data.check()
    return data.take_queries(config.max_queries) if config.max_queries else data


def load_faq() -> RetrievalData:
    """The Swedish construction FAQ, English side (503 question -> answer pairs, 39 categories)."""
    try:
        import zaragoza_construction_faq as faq
    except ImportError:
        raise FinetuneError(
            "the builtin FAQ needs its package; pip install zaragoza-construction-faq",
            where="data.name construction-faq",
        ) from None
    path = Path(faq.__file__).parent / "data" / "faq-en.jsonl"
    data = pairs_to_data(list(iter_jsonl(path)), FAQ_COLUMNS, where=str(path))
    data.source = "construction-faq"
    return data


def pairs_to_data(rows: list[dict[str, Any]], columns: ColumnsConfig, where: str) -> RetrievalData:
    """Turn (query, positive[, negative]) rows into queries, a corpus and relevance.

    Documents are de-duplicated by text. Rows that share a query (same id, or the same text when
    there is no id column) become one query with several relevant documents.
    """
    _check_columns(rows[0], columns, where)
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    domains: dict[str, str] = {}
    negatives: dict[str, list[str]] = {}
    doc_ids: dict[str, str] = {}
    qid_by_text: dict[str, str] = {}

    def doc_id(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    for i, row in enumerate(rows, 1):
        line = f"{where} row {i}"
        query, positive = _text(row, columns.query, line), _text(row, columns.positive, line)
        if columns.id:
            qid = str(row.get(columns.id, "")).strip()
            if not qid:
                raise FinetuneError(f"empty id in column '{columns.id}'", where=line)
            if qid in queries and queries[qid] != query:
                raise FinetuneError(f"duplicate id '{qid}' for two different queries; ids must be unique", where=line)
        else:
            qid = qid_by_text.setdefault(query, f"q{len(qid_by_text)}")
        queries[qid] = query
        relevant.setdefault(qid, set()).add(doc_id(positive))
        if columns.domain and row.get(columns.domain) not in (None, ""):
            domains[qid] = str(row[columns.domain])
        if columns.negative and row.get(columns.negative) not in (None, ""):
            negs = row[columns.negative]
            for neg in negs if isinstance(negs, list) else [negs]:
                negatives.setdefault(qid, []).append(doc_id(str(neg)))
    corpus = {did: text for text, did in doc_ids.items()}
    return RetrievalData(queries, corpus, relevant, domains, negatives, source=where)


def _check_columns(row: dict[str, Any], columns: ColumnsConfig, where: str) -> None:
    for role in ("query", "positive", "negative", "id", "domain"):
        col = getattr(columns, role)
        if col is not None and col not in row:
            hint = did_you_mean(col, row) or f" (columns are: {', '.join(map(str, row))})"
            raise FinetuneError(f"no column '{col}' for the {role}{hint}; set data.columns.{role}", where=where)


def _text(row: dict[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if value is None or not str(value).strip():
        raise FinetuneError(f"empty '{column}'", where=where)
    return str(value).strip()


def load_beir(path: str | Path) -> RetrievalData:
    """Read a BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,dev,test}.tsv``.

    When ``train.tsv`` and ``test.tsv`` both exist, their split is kept (``dev.tsv`` becomes validation).
    """
    root = Path(path)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
            raise FinetuneError(f"BEIR folder has no {name}", where=str(root))
    corpus = {}
    for lineno, row in numbered_jsonl(root / "corpus.jsonl"):
        where = f"{root / 'corpus.jsonl'} line {lineno}"
        did = str(row.get("_id", ""))
        # a document with a title and an empty text is kept (BEIR sets have them); one with neither has nothing to find
        text = " ".join(p for p in (str(row.get("title") or "").strip(), str(row.get("text") or "").strip()) if p)
        if not did:
            raise FinetuneError("corpus row has no '_id'; give every document an id", where=where)
        if not text:
            message = f"document '{did}' has neither 'text' nor 'title'; fill one or drop the row"
            raise FinetuneError(message, where=where)
        if did in corpus:
            raise FinetuneError(f"duplicate document id '{did}'", where=where)
        corpus[did] = text
    all_queries = {}
    for row in iter_jsonl(root / "queries.jsonl"):
        qid = str(row.get("_id", ""))
        if qid in all_queries:
            raise FinetuneError(f"duplicate query id '{qid}'", where=str(root / "queries.jsonl"))
        all_queries[qid] = str(row.get("text") or "").strip()
    qrel_files = sorted((root / "qrels").glob("*.tsv"))
    if not qrel_files:
        raise FinetuneError("BEIR folder has no qrels/*.tsv", where=str(root))
    relevant: dict[str, set[str]] = {}
    predefined: dict[str, str] = {}
    names = {f.stem for f in qrel_files}
    use_split = {"train", "test"} <= names
    for f in qrel_files:
        split = {"dev": "val", "validation": "val"}.get(f.stem, f.stem)
        for qid, did, lineno in _read_qrels(f):
            if qid not in all_queries:
                raise FinetuneError(f"query '{qid}' is not in queries.jsonl", where=f"{f} line {lineno}")
            if did not in corpus:
                raise FinetuneError(f"document '{did}' is not in corpus.jsonl", where=f"{f} line {lineno}")
            relevant.setdefault(qid, set()).add(did)
            if use_split and split in ("train", "val", "test"):
                if predefined.setdefault(qid, split) != split:
                    raise FinetuneError(
                        f"query '{qid}' is in two qrels splits ({predefined[qid]}, {split})", where=str(f)
                    )
    queries = {qid: all_queries[qid] for qid in all_queries if qid in relevant}
    return RetrievalData(queries, corpus, relevant, predefined=predefined, source=str(root))


def _read_qrels(path: Path):
    lines = io.StringIO(read_text(path), newline="")
    for lineno, parts in enumerate(csv.reader(lines, delimiter="\t"), 1):
        if not parts or (lineno == 1 and parts[0] == "query-id"):
            continue
        if len(parts) < 2:
            raise FinetuneError("expected 'query-id<TAB>corpus-id<TAB>score'", where=f"{path} line {lineno}")
        score = parts[2] if len(parts) > 2 else "1"
        try:
            positive = float(score) > 0
        except ValueError:
            raise FinetuneError(f"score '{score}' is not a number", where=f"{path} line {lineno}") from None
        if positive:
            yield parts[0], parts[1], lineno


def load_hf(config: DataConfig) -> RetrievalData:
    """A Hugging Face dataset of pairs: ``load_from_disk(path)`` or ``load_dataset(name, split=...)``."""
    import datasets

    where = config.path or config.name
    try:
        if config.path:
            ds = datasets.load_from_disk(config.path)
        else:
            ds = datasets.load_dataset(config.name, split=config.split or "train")
    except Exception as exc:
        raise FinetuneError(
            f"could not load the dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", where=where
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = config.split or "train"
        if split not in ds:
            raise FinetuneError(f"no split '{split}' (has: {', '.join(ds)}); set data.split", where=where)
        ds = ds[split]
    if len(ds) == 0:
        raise FinetuneError("dataset has no rows", where=where)
    return pairs_to_data(ds.to_list(), config.columns, where=where)
