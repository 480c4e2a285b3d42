"""A teacher for the qlora kind (issue 39): its scores are the training rows' labels, positive first, computed once
and cached; the student learns them; a reranker run teaches as well as a bi-encoder; bad teachers are one line."""

from __future__ import annotations

import json
import shutil
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


def test_in_batch_labels_index_the_teachers_embeddings(tiny_model, tiny_model_wide, tmp_path, cache_dir):
    """in_batch_kl: each row's (query, positive, negatives) indices give the same cosines as kl_div's scores."""
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.mining import find_negatives
    from finetune.qlora.teacher import teacher_embeddings, teacher_labels
    from finetune.recipe import validate_recipe

    raw = taught_recipe(tmp_path, tiny_model, tiny_model_wide)
    recipe, in_batch = (
        validate_recipe(raw),
        validate_recipe({**raw, "teacher": {**raw["teacher"], "loss": "in_batch_kl"}}),
    )
    data = load_data(recipe.data)
    train = list(data.queries)[:20]
    negatives = find_negatives(data, train, recipe.negatives, model=SentenceTransformer(str(tiny_model)))
    scores, _ = teacher_labels(recipe, data, train, negatives, "cpu")
    indices, (queries, documents), record = teacher_embeddings(in_batch, data, train, negatives, "cpu")
    assert indices.shape == (len(scores), 4) and indices.dtype == torch.int64
    assert len(queries) == 20 and len(documents) == len(set(indices[:, 1:].reshape(-1).tolist()))
    rows = (queries[indices[:, :1]] * documents[indices[:, 1:]]).sum(-1)
    assert rows == pytest.approx(scores, abs=1e-5)
    assert record["loss"] == "in_batch_kl" and record["temperature"] == 0.05 and not record["cache"]["hit"]
    again = teacher_embeddings(in_batch, data, train, negatives, "cpu")
    assert again[2]["cache"]["hit"] and torch.equal(again[0], indices) and torch.equal(again[1][1], documents)


def _batch(model, size: int = 8):
    texts = [[f"query {i} about {t}" for i, t in enumerate("abcdefgh"[:size])]]
    texts += [[f"document {j}{i} on {t}" for i, t in enumerate("abcdefgh"[:size])] for j in range(2)]
    return texts, [model.tokenize(column) for column in texts]


def test_in_batch_kl_is_zero_when_the_student_is_its_own_teacher(tiny_model):
    """The teacher's candidates line up with the student's (every positive, then every negative): a student scored
    against its own embeddings diverges by nothing, and by something once the teacher's documents are reordered."""
    from sentence_transformers import SentenceTransformer

    from finetune.qlora.losses import DistillationLoss, InBatchKL

    student = SentenceTransformer(str(tiny_model), device="cpu")
    texts, features = _batch(student)
    labels = torch.tensor([[i, i, 8 + i] for i in range(8)])  # query i; positive i, negative 8 + i in the table
    with torch.no_grad():
        queries = student.encode(texts[0], convert_to_tensor=True, normalize_embeddings=True)
        documents = student.encode(texts[1] + texts[2], convert_to_tensor=True, normalize_embeddings=True)
        same = DistillationLoss(student, InBatchKL(queries, documents, 0.05))(features, labels).item()
        other = DistillationLoss(student, InBatchKL(queries, documents.flip(0), 0.05))(features, labels).item()
    assert same == pytest.approx(0.0, abs=1e-5) and other > 1e-3


def test_in_batch_distillation_moves_the_student_to_the_teachers_ranking(tiny_model):
    """Trained on the in-batch KL alone, the student comes to pick the document the teacher puts first."""
    from sentence_transformers import SentenceTransformer

    from finetune.qlora.losses import DistillationLoss, InBatchKL

    torch.manual_seed(0)
    student = SentenceTransformer(str(tiny_model), device="cpu")
    _, features = _batch(student)
    queries = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(16, 16), dim=-1)
    labels = torch.tensor([[i, i, 8 + i] for i in range(8)])
    loss = DistillationLoss(student, InBatchKL(queries, documents, temperature=0.05))
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    values = []
    for _ in range(120):
        value = loss(features, labels)
        values.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert values[-1] < 0.2 * values[0]
    with torch.no_grad():
        e = [torch.nn.functional.normalize(student(f)["sentence_embedding"], dim=-1) for f in features]
        student_best = (e[0] @ torch.cat(e[1:]).T).argmax(1)
    assert (student_best == (queries @ documents.T).argmax(1)).sum() >= 7  # of 8: Adam still wobbles a little


def test_a_taught_qlora_run_records_its_teacher(tiny_model, tiny_model_wide, tmp_path, cache_dir):
    for loss in ("kl_div", "in_batch_kl"):
        (tmp_path / loss).mkdir()
        run = _run(taught_recipe(tmp_path / loss, tiny_model, tiny_model_wide, mnrl_weight=0.5, loss=loss))
        metrics = json.loads((run / "metrics.json").read_text())
        teacher = metrics["teacher"]
        assert teacher["kind"] == "bi-encoder" and teacher["mnrl_weight"] == 0.5 and teacher["rows"] > 0
        assert teacher["loss"] == loss and teacher["temperature"] == 0.05
        assert metrics["train_steps"] == 6 and (run / "model" / "modules.json").is_file()
        assert metrics["memory_plan"]["predicted_rss"]["teacher_encoding"] > 0  # the plan counted the teacher


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

    two, one = tmp_path / "two-labels", tmp_path / "one-label"
    for folder, labels in ((two, 2), (one, 1)):
        hf = str(tiny_model.parent / "hf")
        BertForSequenceClassification.from_pretrained(hf, num_labels=labels).save_pretrained(folder)
        AutoTokenizer.from_pretrained(hf).save_pretrained(folder)
    adapter = {"kind": "adapter", "data": _data(tmp_path), "model": str(tiny_model), "teacher": str(tiny_model)}
    no_negatives = taught_recipe(tmp_path, tiny_model, tiny_model)
    no_negatives["negatives"] = {"strategy": "none"}
    unfinished = tmp_path / "unfinished-run"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("kind: qlora\n")
    euclidean = (
        tmp_path / "euclidean"
    )  # a bi-encoder that scores by distance: no dot product of its tables is its score
    shutil.copytree(tiny_model, euclidean)
    settings = json.loads((euclidean / "config_sentence_transformers.json").read_text())
    (euclidean / "config_sentence_transformers.json").write_text(
        json.dumps({**settings, "similarity_fn_name": "euclidean"})
    )
    cases = [
        (adapter, "teacher: unknown field for adapter recipes"),
        (taught_recipe(tmp_path, tiny_model, unfinished), "this run directory has not finished"),
        (no_negatives, "negatives.strategy is none; set negatives.strategy=mined"),
        (taught_recipe(tmp_path, tiny_model, two), "the teacher is a classifier with 2 labels"),
        (taught_recipe(tmp_path, tiny_model, one, loss="in_batch_kl"), "teacher.loss: in_batch_kl scores every query"),
        (taught_recipe(tmp_path, tiny_model, euclidean, loss="in_batch_kl"), "and this one scores by euclidean"),
        (taught_recipe(tmp_path, tiny_model, tmp_path / "nowhere"), "teacher.model.name /"),  # the field that named it
    ]
    for raw, expected in cases:
        capsys.readouterr()
        assert main(["run", _write(tmp_path, raw)]) == 2
        out = capsys.readouterr()
        lines = [x for x in out.err.strip().splitlines() if x.startswith("error")]
        assert len(lines) == 1 and expected in lines[0], lines
        assert "memory plan" not in out.out + out.err  # refused before the run plans, loads and encodes
        assert not (tmp_path / "runs").exists()


def test_the_plan_counts_the_teachers_encoding_and_checkpoints_for_training_only(
    tiny_model, tiny_model_wide, tmp_path, monkeypatch
):
    """The teacher encodes before training and is freed: the peak RSS is the larger of its encoding and the training
    step, and ``gradient_checkpointing: auto`` decides on training alone (checkpointing cannot shrink the teacher)."""
    import finetune.qlora.plan as recipe_plan
    from finetune.data import load_data
    from finetune.qlora.teacher import check_teacher
    from finetune.recipe import validate_recipe

    def plan(batch_size: int | None):
        raw = taught_recipe(tmp_path, tiny_model, tiny_model_wide)
        raw["train"]["gradient_checkpointing"] = "auto"
        if batch_size is None:
            del raw["teacher"]
        else:
            raw["teacher"]["model"]["batch_size"] = batch_size
        recipe = validate_recipe(raw)
        return recipe_plan.plan_recipe(
            recipe, "cpu", load_data(recipe.data), None, 10**9, check_teacher(recipe.teacher)
        )

    alone = plan(None)
    needs = alone.rss()["total"] - alone.process_bytes  # what training adds
    monkeypatch.setattr(recipe_plan, "free_memory", lambda device: 100 * needs)
    monkeypatch.setattr(recipe_plan, "machine_memory", lambda: 4 * needs + 2**22)  # training fits: no checkpointing
    alone, small, large = plan(None), plan(1), plan(100_000)
    assert alone.rss()["teacher_encoding"] == 0 and small.rss()["teacher_encoding"] > 0
    assert small.rss()["total"] == alone.rss()["total"]  # under the step: the peak is training's
    held = large.rss()["total"] - large.rss()["teacher_encoding"]
    assert (
        large.rss()["teacher_encoding"] > large.rss()["training_step"]
        and held == alone.rss()["total"] - alone.rss()["training_step"]
    )
    assert large.peak() == large.teacher_phase() > alone.peak()
    assert "teacher encoding" in large.line() and "teacher encoding" not in alone.line()
    assert not large.setup.checkpointing and not alone.setup.checkpointing, large.auto_checkpointing


def test_the_teachers_longest_batch_is_its_own_tokenizers(tiny_model, tmp_path):
    """The plan sizes the teacher's batch by its own tokenizer, as sentence-transformers pads it, cut at its length."""
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.qlora.teacher import Teacher, longest_batch
    from finetune.recipe import validate_recipe

    data = load_data(validate_recipe(taught_recipe(tmp_path, tiny_model, tiny_model)).data)
    teacher = SentenceTransformer(str(tiny_model), device="cpu")
    longest = max(len(t) for t in data.corpus.values())
    tokens = teacher.preprocess([t for t in data.corpus.values() if len(t) == longest])["input_ids"].shape[1]
    assert 8 < tokens < teacher.max_seq_length
    assert longest_batch(Teacher("bi-encoder", tiny_model), 128, data) == tokens
    assert longest_batch(Teacher("bi-encoder", tiny_model), 8, data) == 8
    assert longest_batch(Teacher("bi-encoder", tiny_model), 128, None) == 128
    queries = max(len(t) for t in data.queries.values())
    query = teacher.preprocess([t for t in data.queries.values() if len(t) == queries])["input_ids"].shape[1]
    assert longest_batch(Teacher("cross-encoder", tiny_model), 128, data) == min(128, query + tokens)


def test_the_plan_command_prints_the_teachers_encoding(tiny_model, tiny_model_wide, tmp_path, capsys):
    """``python -m finetune plan`` on a taught recipe says what the teacher's encoding needs, by its batch."""
    import re

    raw = taught_recipe(tmp_path, tiny_model, tiny_model_wide)
    peaks = []
    for batch in (1, 4096):
        raw["teacher"]["model"]["batch_size"] = batch
        assert main(["plan", _write(tmp_path, raw)]) == 0
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("teacher ")]
        assert len(lines) == 1 and "once before training" in lines[0], lines
        peaks.append(float(re.search(r"peaks at ([0-9.]+) GiB", lines[0]).group(1)))
    assert peaks[1] > peaks[0]
    del raw["teacher"]
    assert main(["plan", _write(tmp_path, raw)]) == 0
    assert "teacher " not in capsys.readouterr().out
