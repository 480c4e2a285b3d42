"""Shared fixtures: tiny in-process BERT encoders and small data sets. No test downloads anything."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHARS = list(string.ascii_lowercase + string.digits + string.punctuation)
TOPICS = [
    "permit",
    "roof",
    "window",
    "tax",
    "radon",
    "garage",
    "kitchen",
    "paint",
    "heating",
    "drain",
    "fence",
    "solar",
]


def build_tiny_model(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """Save a 2-layer character-level BERT as a SentenceTransformer (Transformer -> mean Pooling -> Normalize)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    raw = folder / "hf"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CHARS + ["##" + c for c in CHARS]
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(raw)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension()), Normalize()], device="cpu"
    )
    out = folder / "st"
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a 32-d tiny SentenceTransformer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny32"), hidden=32)


@pytest.fixture(scope="session")
def tiny_model_wide(tmp_path_factory) -> Path:
    """Folder of a 64-d tiny SentenceTransformer (a second width)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny64"), hidden=64, seed=1)


COLUMNS_PAIRS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def make_pairs(n: int = 60) -> list[dict]:
    """Synthetic question/answer pairs sharing topic words, with ids and a domain per topic."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "id": f"faq-{i:03d}",
                "question": f"how do i fix the {topic} problem number {i}?",
                "answer": f"to fix {topic} issue {i}, call a {topic} expert and follow step {i % 7}.",
                "category": topic,
                "negative": f"unrelated note {i} about {TOPICS[(i + 3) % len(TOPICS)]}.",
            }
        )
    return rows


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()), encoding="utf-8")
    return path


def write_beir(folder: Path, n: int = 40, with_splits: bool = True) -> Path:
    """A small BEIR folder: corpus.jsonl, queries.jsonl, qrels/train.tsv and qrels/test.tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_pairs(n)
    with (folder / "corpus.jsonl").open("w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"_id": f"doc{i}", "title": r["category"], "text": r["answer"]}) + "\n")
        f.write(json.dumps({"_id": "extra", "title": "", "text": "a document no query needs"}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"_id": f"q{i}", "text": r["question"]}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    split_of = (lambda i: "test" if i % 4 == 0 else "train") if with_splits else (lambda i: "test")
    files = {}
    for i in range(n):
        files.setdefault(split_of(i), []).append(f"q{i}\tdoc{i}\t1\n")
    for name, lines in files.items():
        (folder / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(lines))
    return folder


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    return write_beir(tmp_path / "beir")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(path))
    return path


def qlora_recipe(data, model_path: Path, tmp_path: Path, steps: int = 12, **sections) -> dict:
    """A raw QLoRA recipe for tests: tiny model, ``steps`` optimizer steps (the epochs never bind first)."""
    raw = {
        "kind": "qlora",
        "name": "q",
        "model": {"name": str(model_path), "batch_size": 16},
        "data": data,
        "train": {
            "epochs": 100,
            "max_steps": steps,
            "batch_size": 8,
            "lr": 5e-3,
            "eval_steps": 4,
            "logging_steps": 1,
            "warmup_ratio": 0.0,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return raw


def qlora_onnx_run(model_path: Path, tmp_path: Path, steps: int = 4, echo=lambda *_: None) -> Path:
    """A finished tiny QLoRA run with ``export.onnx: true`` on 60 pairs; its run directory."""
    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(60)))
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS_PAIRS}, model_path, tmp_path, steps=steps)
    raw["export"] = {"onnx": True}
    return run_recipe(validate_recipe(raw), echo=echo)


def adapter_recipe(data, model: Path, tmp_path: Path, **sections) -> dict:
    """A raw adapter recipe for tests: tiny model, short schedule, outputs and cache under tmp_path."""
    raw = {
        "kind": "adapter",
        "name": "test",
        "model": {"name": str(model), "batch_size": 16},
        "data": data,
        "train": {"epochs": 3, "batch_size": 8, "patience": None},
        "cache": {"dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return raw


def score_on_run_split(run_dir: Path, model_folder: Path, trust_remote_code: bool = False) -> dict:
    """Test metrics of ``model_folder``, loaded by plain sentence-transformers, on ``run_dir``'s own saved test split.

    Reads the data through the run's resolved ``recipe.yaml`` and its ``splits.json`` only, as a user would.
    """
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.evaluation import build_evaluator, evaluate
    from finetune.recipe import load_recipe
    from finetune.splits import Splits

    data = load_data(load_recipe(str(run_dir / "recipe.yaml")).data)
    test = Splits.load(run_dir / "splits.json").test
    model = SentenceTransformer(str(model_folder), device="cpu", trust_remote_code=trust_remote_code)
    return evaluate(build_evaluator(data, test, "test"), model)


def fit(runner, run_dir: Path) -> dict:
    """A runner's train and finish phases from a fresh start, as ``run_recipe`` calls them: the
    metrics it would write (``per_query`` included)."""
    from finetune.contract import Start

    runner.train(run_dir, Start.fresh())
    outcome = runner.finish(run_dir)
    return {**outcome.metrics(), "per_query": outcome.per_query()}
