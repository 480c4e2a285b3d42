"""Adapter recipes over an API embedding model (a fake OpenAI-compatible server on 127.0.0.1)."""

import json
import logging
import math

import pytest
from conftest import adapter_recipe
from fake_openai import FakeOpenAI

from finetune.errors import FinetuneError
from finetune.recipe import validate_recipe
from finetune.run import run_recipe

KEY = "sk-live-DO-NOT-LOG-987654321"
COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _api_recipe(tmp_path, pairs_file, url, **model):
    model = {
        "provider": "openai_compatible",
        "name": "fake-embed",
        "base_url": url,
        "dimensions": 32,
        "api_key_env": "FAKE_EMBED_KEY",
        "batch_size": 16,
        **model,
    }
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tmp_path, tmp_path)
    return validate_recipe(dict(raw, model=model))


def test_adapter_trains_over_api_embeddings_batched_retried_and_cached_without_leaking_the_key(
    tmp_path, pairs_file, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("FAKE_EMBED_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(embedding_429_first=True) as fake:
        recipe = _api_recipe(tmp_path, pairs_file, fake.base_url)
        run_dir = run_recipe(recipe)
        calls = [r for r in fake.requests if r["path"] == "/v1/embeddings"]
        # 60 documents and 60 queries in batches of 16, plus the one rate-limited attempt
        assert (
            len(calls) == 2 * math.ceil(60 / 16) + 1 and calls[0]["status"] == 429 and max(r["n"] for r in calls) == 16
        )
        assert {r["auth"] for r in calls} == {f"Bearer {KEY}"}
        again = run_recipe(recipe.model_copy(update={"name": "again"}))
        assert len([r for r in fake.requests if r["path"] == "/v1/embeddings"]) == len(calls)  # all from the cache
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"][1:]]  # it trained on the API embeddings
    assert losses[-1] < losses[0] and metrics["model_source"].startswith("openai_compatible")
    assert (run_dir / "adapter" / "adapter.safetensors").is_file() and not (run_dir / "model").exists()
    assert json.loads((again / "metrics.json").read_text())["base"] == metrics["base"]

    everything = [p for root in (tmp_path / "runs", tmp_path / "cache") for p in root.rglob("*") if p.is_file()]
    assert everything and not any(KEY.encode() in p.read_bytes() for p in everything)
    assert KEY not in caplog.text and KEY not in capsys.readouterr().out


def test_wrong_dimensions_from_the_endpoint_is_one_clear_error(tmp_path, pairs_file, monkeypatch):
    from finetune.api_embedder import ApiEmbedder

    with FakeOpenAI() as fake:
        embedder = ApiEmbedder(_api_recipe(tmp_path, pairs_file, fake.base_url, dimensions=None).model)
        assert embedder.encode_document(["a", "b", "c"]).shape == (3, 48)
        bad = _api_recipe(tmp_path, pairs_file, fake.base_url).model.model_copy(update={"dimensions": 31})
        fake.answer = lambda path, body, auth: (200, {"data": [{"index": 0, "embedding": [1.0] * 8}]}, {})
        with pytest.raises(FinetuneError, match="asked for 31-d embeddings, got 8-d"):
            ApiEmbedder(bad).encode_document(["a"])


def test_unreachable_endpoint_and_misplaced_key_are_clear(tmp_path, pairs_file):
    from finetune.api_embedder import ApiEmbedder

    model = _api_recipe(tmp_path, pairs_file, "http://127.0.0.1:9/v1", max_retries=0).model
    with pytest.raises(FinetuneError, match=r"127.0.0.1:9/v1/embeddings: no usable answer after 1 attempts"):
        ApiEmbedder(model).encode_document(["a"])
    with pytest.raises(FinetuneError, match="api_key_env names an environment variable, not the key"):
        _api_recipe(tmp_path, pairs_file, "http://127.0.0.1:9/v1", api_key_env="sk-abc")
    with pytest.raises(FinetuneError, match="QLoRA recipe trains the encoder"):
        validate_recipe(
            {
                "kind": "qlora",
                "data": {"path": str(pairs_file)},
                "model": {"provider": "openai_compatible", "base_url": "http://x/v1"},
            }
        )
