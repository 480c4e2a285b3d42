"""A teacher for the qlora kind (issue 39): its scores are the training rows' labels, positive first, computed once
and cached; the student learns them; a reranker run teaches as well as a bi-encoder; bad teachers are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import COLUMNS_PAIRS, make_pairs, qlora_recipe

from finetune.cli import main


def _data(tmp_path: Path) -> dict:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(60)))
    return {"path": str(path), "columns": COLUMNS_PAIRS}


def taught_recipe(tmp_path: Path, student: Path, teacher, **teacher_fields) -> dict:
    raw = qlora_recipe(_data(tmp_path), student, tmp_path, steps=6, quantization="none")
    raw["negatives"] = {"strategy": "mined", "per_query": 2}
    raw["teacher"] = {"model": {"name": str(teacher), "batch_size": 16}, **teacher_fields}
    return raw


def _run(raw: dict) -> Path:
    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    return run_recipe(validate_recipe(raw), echo=lambda *_: None)


def test_the_labels_are_the_teachers_cosines_positive_first(tiny_model, tiny_model_wide, tmp_path, cache_dir):
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.mining import find_negatives
    from finetune.qlora.teacher import Distillation, teacher_labels
    from finetune.qlora.train import train_dataset
    from finetune.recipe import validate_recipe

    recipe = validate_recipe(taught_recipe(tmp_path, tiny_model, tiny_model_wide))
    data = load_data(recipe.data)
    train = list(data.queries)[:20]
    negatives = find_negatives(data, train, recipe.negatives, model=SentenceTransformer(str(tiny_model)))
    labels, record = teacher_labels(recipe, data, train, negatives, "cpu")
    distillation = Distillation(recipe.teacher, record["temperature"], labels, record)
    dataset = train_dataset(data, train, negatives, distillation)  # what the trainer reads
    teacher = SentenceTransformer(str(tiny_model_wide), device="cpu")
    assert labels.shape == (len(dataset), 3) and record["kind"] == "bi-encoder" and record["temperature"] == 0.05
    for row in dataset.select(range(0, len(dataset), 4)):
        query = teacher.encode_query([row["anchor"]], convert_to_tensor=True)
        documents = teacher.encode_document(
            [row["positive"], row["negative_1"], row["negative_2"]], convert_to_tensor=True
        )
        assert row["label"] == pytest.approx(teacher.similarity(query, documents)[0].tolist(), abs=1e-5)
    assert not record["cache"]["hit"]
    again, second = teacher_labels(recipe, data, train, negatives, "cpu")
    assert second["cache"]["hit"] and torch.equal(again, labels)
    assert Path(second["cache"]["file"]).parent == cache_dir.parent / "teacher_scores"


def test_distillation_moves_the_students_scores_to_the_teachers(tiny_model):
    """The KL loss falls and the student's softmax over (positive, negatives) comes to rank as the teacher's does."""
    from sentence_transformers import SentenceTransformer

    from finetune.qlora.config import TeacherConfig
    from finetune.qlora.losses import distillation_loss

    torch.manual_seed(0)
    student = SentenceTransformer(str(tiny_model), device="cpu")
    texts = [[f"query {i} about {t}" for i, t in enumerate("abcdefgh")]]
    texts += [[f"document {j}{i} on {t}" for i, t in enumerate("abcdefgh")] for j in range(3)]
    features = [student.tokenize(column) for column in texts]
    teacher = torch.tensor([[0.1, 0.9, 0.3]] * 4 + [[0.8, 0.2, 0.5]] * 4)  # a different best document per half
    loss = distillation_loss(student, TeacherConfig(model="t"), temperature=0.05)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        value = loss(features, teacher)
        first = value.item() if first is None else first
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert value.item() < 0.5 * first
    with torch.no_grad():
        e = [student(f)["sentence_embedding"] for f in features]
        scores = torch.stack([torch.nn.functional.cosine_similarity(e[0], x) for x in e[1:]], dim=1)
    assert torch.equal(scores.argmax(1), teacher.argmax(1))


def test_a_taught_qlora_run_records_its_teacher(tiny_model, tiny_model_wide, tmp_path, cache_dir):
    run = _run(taught_recipe(tmp_path, tiny_model, tiny_model_wide, mnrl_weight=0.5))
    metrics = json.loads((run / "metrics.json").read_text())
    teacher = metrics["teacher"]
    assert teacher["kind"] == "bi-encoder" and teacher["mnrl_weight"] == 0.5 and teacher["rows"] > 0
    assert metrics["train_steps"] == 6 and (run / "model" / "modules.json").is_file()


def test_a_reranker_run_teaches_by_its_logits(tiny_model, tmp_path, cache_dir):
    from test_reranker import reranker_recipe

    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    rr = tmp_path / "rr"
    rr.mkdir()
    reranker_run = run_recipe(validate_recipe(reranker_recipe(rr, tiny_model, tiny_model)), echo=lambda *_: None)
    run = _run(taught_recipe(tmp_path, tiny_model, reranker_run, loss="margin_mse"))
    teacher = json.loads((run / "metrics.json").read_text())["teacher"]
    assert teacher["kind"] == "cross-encoder" and teacher["loss"] == "margin_mse" and teacher["temperature"] is None


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_teachers_are_one_line_and_write_nothing(tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    two = tmp_path / "two-labels"
    BertForSequenceClassification.from_pretrained(str(tiny_model.parent / "hf"), num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(str(tiny_model.parent / "hf")).save_pretrained(two)
    adapter = {"kind": "adapter", "data": _data(tmp_path), "model": str(tiny_model), "teacher": str(tiny_model)}
    no_negatives = taught_recipe(tmp_path, tiny_model, tiny_model)
    no_negatives["negatives"] = {"strategy": "none"}
    unfinished = tmp_path / "unfinished-run"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("kind: qlora\n")
    cases = [
        (adapter, "teacher: unknown field for adapter recipes"),
        (taught_recipe(tmp_path, tiny_model, unfinished), "this run directory has not finished"),
        (no_negatives, "negatives.strategy is none; set negatives.strategy=mined"),
        (taught_recipe(tmp_path, tiny_model, two), "the teacher is a classifier with 2 labels"),
        (taught_recipe(tmp_path, tiny_model, tmp_path / "nowhere"), "teacher.model.name /"),  # the field that named it
    ]
    for raw, expected in cases:
        capsys.readouterr()
        assert main(["run", _write(tmp_path, raw)]) == 2
        lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error")]
        assert len(lines) == 1 and expected in lines[0], lines
        assert not (tmp_path / "runs").exists()
