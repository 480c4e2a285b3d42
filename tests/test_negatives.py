"""Hard negatives: mined with the base model, BM25, and how both recipe families use them."""

import json

import pytest
import torch
from conftest import adapter_recipe, fit

from finetune.config import NegativesConfig
from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError
from finetune.evaluation import CHUNK_CELLS, EmbeddingLookup, query_chunk_size
from finetune.mining import find_negatives
from finetune.recipe import validate_recipe
from finetune.run import run_recipe

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _toy() -> tuple[RetrievalData, EmbeddingLookup]:
    """Four documents on a circle; query q0 is relevant to d0 and nearest to d1, then d2, then d3."""
    angles = torch.tensor([0.0, 0.4, 0.9, 2.5])
    docs = torch.stack([angles.cos(), angles.sin()], 1)
    corpus = {f"d{i}": f"document about topic {i}" for i in range(4)}
    corpus["d4"] = corpus["d0"].upper()  # a near-duplicate of the positive's text (same after lowercasing)
    docs = torch.cat([docs, docs[:1] * 0.999 + torch.tensor([[0.0, 0.04]])])
    data = RetrievalData(
        {"q0": "which topic is zero", "q1": "which topic is three"}, corpus, {"q0": {"d0"}, "q1": {"d3"}}
    )
    query_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [-0.8, 0.6]]), dim=-1)
    lookup = EmbeddingLookup(
        list(data.queries.values()), query_emb, list(corpus.values()), torch.nn.functional.normalize(docs, dim=-1)
    )
    return data, lookup


def test_mined_negatives_are_the_highest_ranked_non_positives_and_skip_near_duplicates():
    data, lookup = _toy()
    top = find_negatives(
        data, ["q0"], NegativesConfig(strategy="mined", per_query=2, relative_margin=None), model=lookup
    )
    assert top.by_query["q0"] == ["d4", "d1"]  # d4 is closer than d1 but is not a positive
    skipped = find_negatives(
        data, ["q0"], NegativesConfig(strategy="mined", per_query=2, relative_margin=0.05), model=lookup
    )
    assert skipped.by_query["q0"] == ["d1", "d2"]  # within 5% of the positive's score: dropped
    assert skipped.stats["filled_random"] == 0


def test_mined_negatives_respect_max_score():
    """Candidates scoring above ``max_score`` (likely unlabelled positives) are never mined."""
    data, lookup = _toy()
    capped = find_negatives(
        data, ["q0"], NegativesConfig(strategy="mined", per_query=2, relative_margin=None, max_score=0.9), model=lookup
    )
    assert capped.by_query["q0"] == ["d2", "d3"]  # d4 (0.99) and d1 (0.94) score above 0.9


def test_a_window_left_short_says_how_many_went_to_chance_and_what_widens_it(caplog):
    """At scale, more distractors crowd the top ranks with near-ties; the run says so and names the fix."""
    data, lookup = _toy()
    narrow = NegativesConfig(strategy="mined", per_query=1, relative_margin=None, max_score=0.9, range_max=1)
    with caplog.at_level("INFO", logger="finetune.mining"):
        short = find_negatives(data, ["q0"], narrow, model=lookup)
    assert short.stats["filled_random"] == 1  # d4 (1.0) and d1 (0.94) are over max_score
    assert "1 slot(s) filled at random (100%): the nearest candidates, ranks 0 to about 1, held too few" in caplog.text
    assert "a larger negatives.range_max" in caplog.text
    wide = find_negatives(data, ["q0"], narrow.model_copy(update={"range_max": 3}), model=lookup)
    assert wide.by_query["q0"] == ["d2"] and wide.stats["filled_random"] == 0  # the advice works


def test_mining_scores_a_bounded_block_of_queries_at_a_time_with_the_same_result(monkeypatch):
    """Memory must not grow as queries x corpus: at 10^5 documents the one block of every training query
    held 2.1 GiB."""
    data, lookup = _toy()
    config = NegativesConfig(strategy="mined", per_query=2, relative_margin=None)
    whole = find_negatives(data, ["q0", "q1"], config, model=lookup)
    blocks = []
    similarity = lookup.similarity
    monkeypatch.setattr(lookup, "similarity", lambda a, b: blocks.append(a.shape[0] * b.shape[0]) or similarity(a, b))
    monkeypatch.setattr("finetune.evaluation.query_chunk_size", lambda n: 1)  # one query against the 5 documents
    chunked = find_negatives(data, ["q0", "q1"], config, model=lookup)
    assert chunked.by_query == whole.by_query
    scored = [cells for cells in blocks if cells > 1]  # the positives' pairwise scores go elsewhere
    assert scored == [5, 5]


def test_a_query_block_holds_a_bounded_number_of_scores_but_enough_queries_to_stay_fast():
    assert query_chunk_size(10_000) * 10_000 <= CHUNK_CELLS < (query_chunk_size(10_000) + 1) * 10_000
    assert query_chunk_size(30_000) * 30_000 <= CHUNK_CELLS
    assert query_chunk_size(10**6) == query_chunk_size(10**8) == 256


def test_bm25_negatives_rank_by_shared_words_and_skip_positives_and_their_text():
    corpus = {
        "pos": "radon gas in the basement",
        "dup": "Radon gas in the basement ",
        "hard": "radon levels and basement ventilation",
        "easy": "how to paint a fence",
        "other": "kitchen tiles",
    }
    data = RetrievalData({"q": "radon in my basement"}, corpus, {"q": {"pos"}})
    mined = find_negatives(data, ["q"], NegativesConfig(strategy="bm25", per_query=1))
    assert mined.by_query["q"] == ["hard"]
    topped_up = find_negatives(data, ["q"], NegativesConfig(strategy="bm25", per_query=3), seed=1)
    assert (
        topped_up.by_query["q"][0] == "hard" and topped_up.stats["filled_random"] == 2
    )  # only one other doc shares words
    assert not {"pos"} & set(topped_up.by_query["q"]) and len(set(topped_up.by_query["q"])) == 3


def test_too_few_documents_for_the_requested_negatives_is_one_clear_error():
    data = RetrievalData({"q": "a"}, {"d0": "a", "d1": "b"}, {"q": {"d0"}})
    with pytest.raises(FinetuneError, match="per_query"):
        find_negatives(data, ["q"], NegativesConfig(strategy="random", per_query=3))


def test_range_must_leave_room_for_the_negatives():
    with pytest.raises(ValueError, match="range_max - range_min"):
        NegativesConfig(strategy="mined", per_query=3, range_min=5, range_max=6)


@pytest.mark.parametrize("strategy", ["mined", "bm25", "none"])
def test_adapter_recipe_trains_with_each_strategy(strategy, tmp_path, tiny_model, pairs_file):
    raw = adapter_recipe(
        {"path": str(pairs_file), "columns": COLUMNS},
        tiny_model,
        tmp_path,
        negatives={"strategy": strategy, **({"per_query": 2} if strategy != "none" else {})},
    )
    run_dir = run_recipe(validate_recipe(raw), echo=lambda *_: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["negatives"]["strategy"] == strategy and metrics["tuned"]["ndcg@10"] > 0
    if strategy != "none":
        assert metrics["negatives"]["queries"] == metrics["splits"]["train"]


def test_triplet_loss_without_negatives_is_refused(tmp_path, tiny_model, pairs_file):
    raw = adapter_recipe(
        {"path": str(pairs_file)}, tiny_model, tmp_path, negatives={"strategy": "none"}, loss={"type": "triplet"}
    )
    with pytest.raises(FinetuneError, match="triplet' needs negatives"):
        validate_recipe(raw)


def test_qlora_dataset_gets_mined_negative_columns_and_trains(tmp_path, tiny_model, pairs_file):
    from finetune.data import load_data
    from finetune.qlora.runner import QLoRARun
    from finetune.qlora.train import train_dataset
    from finetune.splits import make_splits

    raw = {
        "kind": "qlora",
        "name": "q",
        "quantization": "none",
        "model": {"name": str(tiny_model), "batch_size": 16},
        "data": {"path": str(pairs_file), "columns": COLUMNS},
        "negatives": {"strategy": "mined", "per_query": 2, "relative_margin": None},
        "train": {"max_steps": 2, "batch_size": 8, "eval_steps": 2, "warmup_ratio": 0.0},
        "output": {"dir": str(tmp_path / "runs")},
    }
    recipe = validate_recipe(raw)
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    run = QLoRARun(recipe, data, splits, "cpu")
    dataset = train_dataset(run.data, run.splits.train, run.negatives)
    assert dataset.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    relevant_texts = {data.queries[q]: {data.corpus[d] for d in data.relevant[q]} for q in splits.train}
    for row in dataset:
        assert (
            row["negative_1"] not in relevant_texts[row["anchor"]]
            and row["negative_2"] not in relevant_texts[row["anchor"]]
        )
    # mined with the unquantised base model: the first negative is the best-ranked non-positive
    q = splits.train[0]
    scores = run.reference.similarity(
        run.reference.encode_query([data.queries[q]]), run.reference.encode_document(list(data.corpus.values()))
    )[0]
    ranked = [
        d
        for d in (list(data.corpus)[i] for i in scores.argsort(descending=True).tolist())
        if d not in data.relevant[q]
    ]
    assert run.negatives.by_query[q] == ranked[:2]
    metrics = fit(run, tmp_path / "run")
    assert metrics["negatives"]["strategy"] == "mined" and metrics["train_steps"] == 2
