import os
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from finetune.cache import EmbeddingCache
from finetune.models import model_identity

TEXTS = ["first text", "second text", "third"]


@pytest.fixture
def model(tiny_model):
    m = SentenceTransformer(str(tiny_model), device="cpu")
    calls = []
    for name in ("encode_query", "encode_document"):
        original = getattr(m, name)

        def counted(*args, _original=original, **kwargs):
            calls.append(args[0])
            return _original(*args, **kwargs)

        setattr(m, name, counted)
    m.calls = calls
    return m


def test_miss_then_hit_gives_identical_embeddings(tmp_path, model, tiny_model):
    identity = model_identity(tiny_model)
    first = EmbeddingCache(tmp_path).encode(model, identity, TEXTS)
    cache = EmbeddingCache(tmp_path)
    second = cache.encode(model, identity, TEXTS)
    assert len(model.calls) == 1 and (cache.hits, cache.misses) == (1, 0)
    assert torch.equal(first, second) and first.shape == (3, 32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize(
    "change",
    [
        {"texts": ["first text", "second text", "changed"]},
        {"task": "query"},
        {"prompt": "query: "},
        {"normalize": False},
    ],
    ids=["texts", "task", "prompt", "normalize"],
)
def test_any_setting_change_is_a_miss(tmp_path, model, tiny_model, change):
    identity = model_identity(tiny_model)
    cache = EmbeddingCache(tmp_path)
    cache.encode(model, identity, TEXTS)
    cache.encode(model, identity, **{"texts": TEXTS, **change})
    assert cache.misses == 2


def test_max_seq_length_and_model_files_are_part_of_the_key(tmp_path, model, tiny_model):
    cache = EmbeddingCache(tmp_path)
    cache.encode(model, model_identity(tiny_model), TEXTS)
    model.max_seq_length = 8
    cache.encode(model, model_identity(tiny_model), TEXTS)
    assert cache.misses == 2
    weights = tiny_model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    cache.encode(model, model_identity(tiny_model), TEXTS)
    assert cache.misses == 3


def test_force_recaches_and_disabled_never_writes(tmp_path, model, tiny_model):
    identity = model_identity(tiny_model)
    EmbeddingCache(tmp_path).encode(model, identity, TEXTS)
    forced = EmbeddingCache(tmp_path, force=True)
    forced.encode(model, identity, TEXTS)
    assert forced.misses == 1 and len(model.calls) == 2
    off = EmbeddingCache(tmp_path / "off", enabled=False)
    off.encode(model, identity, TEXTS)
    off.encode(model, identity, TEXTS)
    assert off.misses == 2 and not (tmp_path / "off").exists()


def test_encoding_on_two_processes_gives_the_same_embeddings(tmp_path, tiny_model):
    m = SentenceTransformer(str(tiny_model), device="cpu")
    texts = [f"text number {i} about {i % 7}" for i in range(40)]
    one = EmbeddingCache(tmp_path / "a").encode(m, "id", texts, batch_size=8)
    two = EmbeddingCache(tmp_path / "b").encode(m, "id", texts, batch_size=8, devices=["cpu", "cpu"])
    assert torch.allclose(one, two, atol=1e-5)


def test_chunked_encoding_fills_every_row_and_a_hit_is_memory_mapped(tmp_path, model, tiny_model):
    from finetune.cache import encode_in_chunks

    texts = [f"text number {i}" for i in range(7)]
    whole = model.encode_document(texts, convert_to_numpy=True)
    kwargs = {"prompt": None, "batch_size": 4}
    in_memory = encode_in_chunks(model.encode_document, texts, kwargs, chunk=3)  # chunks of 3, 3, 1
    on_disk = encode_in_chunks(model.encode_document, texts, kwargs, file=tmp_path / "e.npy", chunk=3)
    assert in_memory == pytest.approx(whole, abs=1e-6) and on_disk == pytest.approx(whole, abs=1e-6)
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.encode(model, model_identity(tiny_model), texts)
    again = cache.encode(model, model_identity(tiny_model), texts)
    assert _mapped_file(again.data_ptr()).endswith(".npy")  # rows read from the cache file, not copied in
    again[0] = 0  # the caller's copy: the cached file is unchanged
    assert torch.equal(cache.encode(model, model_identity(tiny_model), texts), first)


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process (Linux), or ''."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else ""
    return ""
