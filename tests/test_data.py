import csv
import json

import pytest
from conftest import make_pairs, write_beir

from finetune.config import ColumnsConfig, DataConfig
from finetune.data import load_data
from finetune.errors import FinetuneError

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_pair_files_of_every_format(tmp_path, suffix):
    path = _write(tmp_path / f"pairs{suffix}", make_pairs(24))
    data = load_data(DataConfig(path=str(path), columns=COLUMNS))
    assert data.queries["faq-005"] == "how do i fix the garage problem number 5?"
    assert len(data.queries) == 24 and len(data.corpus) == 24
    doc = next(iter(data.relevant["faq-005"]))
    assert data.corpus[doc].startswith("to fix garage issue 5")
    assert data.domains["faq-005"] == "garage"


def test_rows_sharing_a_query_become_one_query_with_several_positives(tmp_path):
    rows = [
        {"query": "q one", "positive": "a"},
        {"query": "q one", "positive": "b"},
        {"query": "q two", "positive": "a"},
    ]
    data = load_data(DataConfig(path=str(_write(tmp_path / "p.jsonl", rows))))
    assert len(data.queries) == 2 and len(data.corpus) == 2  # documents de-duplicated by text
    (q1,) = [q for q, t in data.queries.items() if t == "q one"]
    assert len(data.relevant[q1]) == 2


def test_negative_column_adds_documents_and_negatives(tmp_path):
    path = _write(tmp_path / "p.jsonl", make_pairs(10))
    data = load_data(DataConfig(path=str(path), columns=dict(COLUMNS, negative="negative")))
    assert len(data.corpus) == 20
    neg = data.negatives["faq-001"][0]
    assert data.corpus[neg].startswith("unrelated note 1") and neg not in data.relevant["faq-001"]


def test_missing_column_names_it_and_suggests(tmp_path):
    path = _write(tmp_path / "p.jsonl", make_pairs(4))
    with pytest.raises(
        FinetuneError,
        match=r"no column 'questions' for the query \(did you mean 'question'\?\); set data.columns.query",
    ):
        load_data(DataConfig(path=str(path), columns=dict(COLUMNS, query="questions")))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": \n')
    with pytest.raises(FinetuneError, match=r"p.jsonl line 2: malformed JSON"):
        load_data(DataConfig(path=str(path)))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(FinetuneError, match="file is empty"):
        load_data(DataConfig(path=str(tmp_path / "e.jsonl")))
    with pytest.raises(FinetuneError, match="file not found"):
        load_data(DataConfig(path=str(tmp_path / "nope.jsonl")))


def test_duplicate_ids_for_different_queries(tmp_path):
    rows = [{"id": "1", "query": "a", "positive": "x"}, {"id": "1", "query": "b", "positive": "y"}]
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(FinetuneError, match="row 2: duplicate id '1'"):
        load_data(DataConfig(path=str(path), columns={"id": "id"}))


def test_empty_text_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"query": "a", "positive": "x"}, {"query": " ", "positive": "y"}])
    with pytest.raises(FinetuneError, match="row 2: empty 'query'"):
        load_data(DataConfig(path=str(path)))


def test_beir_folder_keeps_its_split_and_whole_corpus(beir_dir):
    data = load_data(DataConfig(path=str(beir_dir)))
    assert data.corpus["doc3"].startswith("tax to fix tax issue 3")  # title + text
    assert "extra" in data.corpus  # documents no query needs stay in the corpus
    assert data.predefined["q0"] == "test" and data.predefined["q1"] == "train"
    assert data.relevant["q7"] == {"doc7"}


def test_beir_document_with_a_title_and_no_text_is_kept(tmp_path):
    folder = write_beir(tmp_path / "b", n=8)
    with (folder / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "titled", "title": "Roof repair", "text": ""}) + "\n")
    assert load_data(DataConfig(path=str(folder))).corpus["titled"] == "Roof repair"


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffquery,positive\nwhat is a,it is a\nwhat is b,it is b\n".encode("utf-8"))
    data = load_data(DataConfig(path=str(path)))
    assert sorted(data.queries.values()) == ["what is a", "what is b"]


def test_beir_qrels_naming_unknown_document(tmp_path):
    folder = write_beir(tmp_path / "b", n=8)
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q0\tdoc-missing\t1\n")
    with pytest.raises(FinetuneError, match=r"test.tsv line \d+: document 'doc-missing' is not in corpus.jsonl"):
        load_data(DataConfig(path=str(folder)))


def test_beir_qrels_naming_unknown_query(tmp_path):
    folder = write_beir(tmp_path / "b", n=8)
    with (folder / "qrels" / "train.tsv").open("a") as f:
        f.write("q99\tdoc1\t1\n")
    with pytest.raises(FinetuneError, match="query 'q99' is not in queries.jsonl"):
        load_data(DataConfig(path=str(folder)))


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(make_pairs(12)).save_to_disk(str(tmp_path / "ds"))
    config = DataConfig(path=str(tmp_path / "ds"), columns=COLUMNS)
    assert config.type == "hf"
    data = load_data(config)
    assert len(data.queries) == 12 and data.domains["faq-000"] == "permit"


def test_hf_dataset_dict_split_is_checked(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(make_pairs(4))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(FinetuneError, match="no split 'dev'"):
        load_data(DataConfig(path=str(tmp_path / "dd"), split="dev", columns=COLUMNS))


def test_builtin_faq():
    data = load_data(DataConfig(name="construction-faq"))
    assert len(data.queries) == 503 and len(data.corpus) == 503
    assert len(set(data.domains.values())) == 39
    assert data.queries["bygglov-001"] == "What is a bygglov (building permit)?"


def test_max_queries_keeps_the_whole_corpus():
    data = load_data(DataConfig(name="construction-faq", max_queries=20))
    assert len(data.queries) == 20 and len(data.corpus) == 503


def test_columns_default_to_query_and_positive():
    assert ColumnsConfig().query == "query" and ColumnsConfig().positive == "positive"
