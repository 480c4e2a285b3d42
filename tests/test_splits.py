import json

import pytest

from finetune.config import DataConfig, SplitConfig
from finetune.data import RetrievalData, load_data
from finetune.errors import FinetuneError
from finetune.splits import Splits, make_splits


@pytest.fixture(scope="module")
def faq():
    return load_data(DataConfig(name="construction-faq"))


def test_same_seed_same_splits_other_seed_other_splits(faq):
    a = make_splits(faq, SplitConfig(), seed=1)
    b = make_splits(faq, SplitConfig(), seed=1)
    c = make_splits(faq, SplitConfig(), seed=2)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert set(a.test) != set(c.test)


def test_splits_are_disjoint_cover_all_and_match_fractions(faq):
    s = make_splits(faq, SplitConfig(test_fraction=0.2, val_fraction=0.1), seed=0)
    parts = [set(s.train), set(s.val), set(s.test)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(faq.queries)
    assert abs(len(s.test) - 0.2 * 503) <= 3 and abs(len(s.val) - 0.1 * 503) <= 3


def test_identical_query_texts_never_straddle_train_and_test(faq):
    duplicated = {t for t in faq.queries.values() if list(faq.queries.values()).count(t) > 1}
    assert duplicated, "the FAQ has repeated questions; this test relies on them"
    for seed in range(10):
        s = make_splits(faq, SplitConfig(), seed=seed)
        test_texts = {faq.queries[q] for q in s.test}
        assert not test_texts & {faq.queries[q] for q in s.train + s.val}


def test_group_by_domain_keeps_domains_whole(faq):
    s = make_splits(faq, SplitConfig(group_by_domain=True), seed=3)
    test_domains = {faq.domains[q] for q in s.test}
    assert not test_domains & {faq.domains[q] for q in s.train + s.val}


def test_predefined_split_is_used(beir_dir):
    data = load_data(DataConfig(path=str(beir_dir)))
    s = make_splits(data, SplitConfig(val_fraction=0.1), seed=0)
    assert s.method == "predefined"
    assert set(s.test) == {q for q, p in data.predefined.items() if p == "test"}
    assert s.val and not set(s.val) & set(s.test)


def test_saved_splits_reload_identically(tmp_path, faq):
    s = make_splits(faq, SplitConfig(), seed=5)
    s.save(tmp_path / "splits.json")
    again = make_splits(faq, SplitConfig(file=str(tmp_path / "splits.json")), seed=999)
    assert (again.train, again.val, again.test) == (s.train, s.val, s.test)
    assert json.loads((tmp_path / "splits.json").read_text())["data_fingerprint"] == faq.fingerprint()


def test_splits_file_with_unknown_query(tmp_path, faq):
    (tmp_path / "s.json").write_text(json.dumps({"train": ["nope"], "val": [], "test": ["bygglov-001"]}))
    with pytest.raises(FinetuneError, match="train query 'nope' is not in the data"):
        make_splits(faq, SplitConfig(file=str(tmp_path / "s.json")), seed=0)


def test_splits_file_with_leak(tmp_path, faq):
    (tmp_path / "s.json").write_text(json.dumps({"train": ["bygglov-001"], "val": [], "test": ["bygglov-001"]}))
    with pytest.raises(FinetuneError, match="in both train and test"):
        make_splits(faq, SplitConfig(file=str(tmp_path / "s.json")), seed=0)


def test_empty_test_split_is_an_error():
    tiny = RetrievalData({"q": "text"}, {"d": "doc"}, {"q": {"d"}})
    with pytest.raises(FinetuneError, match="split is empty"):
        make_splits(tiny, SplitConfig(test_fraction=0.2, val_fraction=0.0), seed=0)


def test_splits_load_rejects_other_json(tmp_path):
    (tmp_path / "s.json").write_text("[1, 2]")
    with pytest.raises(FinetuneError, match="needs lists 'train', 'val' and 'test'"):
        Splits.load(tmp_path / "s.json")
