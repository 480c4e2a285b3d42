"""The reranker kind (issue 39): the second stage is scored by the shared evaluator, k is chosen on validation,
a tiny BERT and a tiny Qwen3 in 4-bit fine-tune on CPU, and ``model/`` reloads as a plain ``CrossEncoder(path)``
that reproduces the run's reranked test figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import COLUMNS_PAIRS, make_pairs

from finetune.cli import main
from finetune.reranker.second_stage import FirstStage, choose_k, reranked


def _pairs(tmp_path: Path, n: int = 60) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n)))
    return path


def reranker_recipe(tmp_path: Path, reranker: Path, retriever: Path, **sections) -> dict:
    raw = {
        "kind": "reranker",
        "name": "rr",
        "model": {"name": str(reranker), "batch_size": 16, "max_seq_length": 96},
        "retriever": {"name": str(retriever), "batch_size": 16},
        "data": {"path": str(_pairs(tmp_path)), "columns": COLUMNS_PAIRS},
        "negatives": {"strategy": "mined", "per_query": 2},
        "rerank": {"grid": [0, 3, 10]},
        "train": {"epochs": 1, "max_steps": 6, "batch_size": 8, "lr": 1e-3, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    raw.update(sections)
    return raw


def _run(tmp_path: Path, raw: dict) -> Path:
    from finetune.recipe import validate_recipe
    from finetune.run import run_recipe

    return run_recipe(validate_recipe(raw), echo=lambda *_: None)


def rescored_with_plain_cross_encoder(run_dir: Path) -> tuple[dict, int]:
    """The run's test figures recomputed from its folder alone: data and splits from its recipe and splits.json,
    the retriever as ``SentenceTransformer(path)`` loads it, the reranker as ``CrossEncoder(run/model)``."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from finetune.data import load_data
    from finetune.evaluation import build_evaluator
    from finetune.prompts import Prompts
    from finetune.recipe import load_recipe
    from finetune.reranker.second_stage import first_stage, reranker_logits, score
    from finetune.splits import Splits

    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    data, test = load_data(recipe.data), Splits.load(run_dir / "splits.json").test
    retriever = SentenceTransformer(recipe.retriever.name, device="cpu")
    corpus = retriever.encode_document(list(data.corpus.values()), convert_to_tensor=True)
    first = first_stage(retriever, corpus, data, test, Prompts(None, None), 16)
    k = json.loads((run_dir / "metrics.json").read_text())["reranker"]["k"]
    logits = reranker_logits(CrossEncoder(str(run_dir / "model"), device="cpu"), data, first, k, 16)
    return score(build_evaluator(data, test, "test"), reranked(first, logits, k)), k


# --- the second stage itself -----------------------------------------------------------------------------


def test_reranked_orders_the_top_k_by_logit_and_keeps_the_rest():
    first = FirstStage({"q": ["a", "b", "c", "d", "e"]})
    logits = {"q": [0.1, 0.9, 0.5, 5.0]}
    assert reranked(first, logits, 3)["q"] == ["b", "c", "a", "d", "e"]  # d's logit is past k: ignored
    assert reranked(first, logits, 0)["q"] == ["a", "b", "c", "d", "e"]
    assert reranked(first, {"q": [1.0, 1.0]}, 2)["q"] == ["a", "b", "c", "d", "e"]  # ties keep the retriever's order


def test_k_is_the_best_on_validation_and_the_smallest_on_a_tie():
    assert choose_k({0: 0.70, 5: 0.74, 10: 0.74, 20: 0.73}) == 5
    assert choose_k({0: 0.70, 5: 0.60, 10: 0.65}) == 0  # reranking hurts: no reranking


def test_k_zero_is_the_evaluators_own_figure(tiny_model, tmp_path):
    """The retriever's ranking as read by first_stage, scored through score(), equals evaluate() on the model."""
    from sentence_transformers import SentenceTransformer

    from finetune.data import load_data
    from finetune.evaluation import build_evaluator, evaluate
    from finetune.prompts import Prompts
    from finetune.recipe import validate_recipe
    from finetune.reranker.second_stage import first_stage, score

    recipe = validate_recipe(reranker_recipe(tmp_path, tiny_model, tiny_model))
    data = load_data(recipe.data)
    ids = list(data.queries)[:30]
    model = SentenceTransformer(str(tiny_model), device="cpu")
    corpus = model.encode_document(list(data.corpus.values()), convert_to_tensor=True)
    first = first_stage(model, corpus, data, ids, Prompts(None, None), 16)
    ours = score(build_evaluator(data, ids, "test"), reranked(first, {q: [] for q in ids}, 0))
    theirs = evaluate(build_evaluator(data, ids, "test"), model, corpus_embeddings=corpus)
    assert set(ours) == set(theirs)
    assert all(ours[m] == pytest.approx(theirs[m], abs=1e-12) for m in theirs), (ours, theirs)
    assert ours.per_query.keys() == theirs.per_query.keys()
    for q, row in theirs.per_query.items():
        assert ours.per_query[q] == pytest.approx(row, abs=1e-12), q


# --- whole runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rr-bert")
    return _run(tmp, reranker_recipe(tmp, tiny_model, tiny_model))


def test_a_bert_reranker_run_writes_both_stages_and_chooses_k_on_validation(bert_run):
    metrics = json.loads((bert_run / "metrics.json").read_text())
    reranker = metrics["reranker"]
    assert metrics["kind"] == "reranker" and reranker["head"] == "new"
    assert set(reranker["val_ndcg_by_k"]) == {"0", "3", "10"}  # JSON keys
    assert reranker["k"] == choose_k({int(k): v for k, v in reranker["val_ndcg_by_k"].items()})
    assert reranker["steps"] == 6 and reranker["export_check"]["max_abs_diff"] <= 1e-4
    assert reranker["train_pairs"] == 42 * (1 + 2)  # 42 train queries: a positive and negatives.per_query each
    card = (bert_run / "model" / "README.md").read_text()  # the run's own card, not the library's blank one
    assert "## How this model was made" in card and "- cross-encoder" in card and "retriever alone" in card
    assert f"reorders the top {reranker['k']} of the retriever" in card
    assert "ndcg@10" in metrics["significance"] and (bert_run / "per_query.jsonl").is_file()
    if reranker["k"] == 0:
        assert metrics["tuned"] == metrics["base"]


def test_export_onnx_refuses_a_reranker_run(bert_run, capsys):
    """``export RUN --onnx`` writes a bi-encoder graph: a CrossEncoder folder is refused, not read as one."""
    pytest.importorskip("onnxruntime")
    metrics = (bert_run / "metrics.json").read_text()
    assert main(["export", str(bert_run), "--onnx"]) == 2
    assert "this model/ is a CrossEncoder" in _one_line(capsys)
    assert not (bert_run / "model" / "onnx").exists() and (bert_run / "metrics.json").read_text() == metrics


def test_the_exported_bert_reranker_reproduces_the_runs_figures(bert_run):
    metrics = json.loads((bert_run / "metrics.json").read_text())
    rescored, _ = rescored_with_plain_cross_encoder(bert_run)
    assert rescored["ndcg@10"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-9)
    assert rescored["mrr@10"] == pytest.approx(metrics["tuned"]["mrr@10"], abs=1e-9)
    if metrics["reranker"]["k"]:
        assert_reloaded_logits_match(bert_run)


def test_a_fixed_k_reranks_and_the_base_row_is_the_retriever_alone(tiny_model, tiny_model_wide, tmp_path):
    from finetune.data import load_data
    from finetune.evaluation import build_evaluator, evaluate
    from finetune.recipe import validate_recipe
    from finetune.splits import Splits

    raw = reranker_recipe(tmp_path, tiny_model, tiny_model_wide, rerank={"k": 10})
    run = _run(tmp_path, raw)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reranker"]["k"] == 10 and metrics["reranker"]["val_ndcg_by_k"] is None
    from sentence_transformers import SentenceTransformer

    data = load_data(validate_recipe(raw).data)
    test = Splits.load(run / "splits.json").test
    alone = evaluate(build_evaluator(data, test, "test"), SentenceTransformer(str(tiny_model_wide), device="cpu"))
    assert metrics["base"]["ndcg@10"] == pytest.approx(alone["ndcg@10"], abs=1e-9)
    rescored, _ = rescored_with_plain_cross_encoder(run)
    assert rescored["ndcg@10"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-9)
    from finetune.compare import comparison_rows

    base_row, run_row = comparison_rows([run])
    assert base_row["name"] == f"base ({tiny_model_wide})" and run_row["ndcg@10"] == metrics["tuned"]["ndcg@10"]


def build_tiny_qwen3_lm(folder: Path) -> Path:
    """A 2-layer Qwen3 causal LM with a character tokenizer that also knows the tokens 'yes' and 'no'."""
    import torch
    import transformers as tf
    from families import _config, char_tokenizer

    tokenizer, _ = char_tokenizer(padding_side="left", eos="<|endoftext|>")
    tokenizer.add_tokens(["yes", "no"])
    config = _config("qwen3", len(tokenizer), 64)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    tf.Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tiny_qwen3_reranker_trains_in_4bit_on_cpu_and_reloads(tiny_model, tmp_path):
    """QLoRA on a decoder LLM reranker (yes/no logits): only LoRA trains, and CrossEncoder(model/) reproduces
    the run's reranked test figures (its logits to 1e-4 of the exported model's)."""
    pytest.importorskip("bitsandbytes")
    qwen = build_tiny_qwen3_lm(tmp_path / "qwen")
    raw = reranker_recipe(tmp_path, qwen, tiny_model, method="lora", quantization="nf4", lora={"r": 4, "alpha": 8})
    raw["rerank"] = {"k": 5}
    run = _run(tmp_path, raw)
    metrics = json.loads((run / "metrics.json").read_text())
    reranker = metrics["reranker"]
    assert reranker["head"] == "yes_no" and reranker["lora_targets"]
    assert reranker["trainable_parameters"] < 30_000  # LoRA only: the 4-bit base and the LM head stay frozen
    assert reranker["export_check"]["max_abs_diff"] <= 1e-4
    assert (run / "model" / "config.json").is_file() and not (run / "model" / "adapter_config.json").exists()
    rescored, k = rescored_with_plain_cross_encoder(run)
    assert k == 5 and rescored["ndcg@10"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-9)
    assert_reloaded_logits_match(run)


def assert_reloaded_logits_match(run: Path) -> None:
    """``CrossEncoder(run/model)``'s raw logits on every reranked test pair equal the run's, to 1e-4."""
    import torch
    from sentence_transformers import CrossEncoder

    from finetune.data import load_data
    from finetune.recipe import load_recipe

    data = load_data(load_recipe(str(run / "recipe.yaml")).data)
    rows = [json.loads(line) for line in (run / "reranked_test.jsonl").read_text().splitlines()]
    pairs = [(data.queries[r["query"]], data.corpus[d]) for r in rows for d in r["documents"]]
    ours = [x for r in rows for x in r["logits"]]
    assert len(pairs) == len(ours) > 0
    plain = CrossEncoder(str(run / "model"), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    assert max(abs(a - b) for a, b in zip(plain.tolist(), ours)) <= 1e-4


# --- bad input -------------------------------------------------------------------------------------------


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "reranker.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda raw: raw.pop("retriever"), ["retriever: required field is missing", "first-stage encoder"]),
        (lambda raw: raw["negatives"].update(strategy="none"), ["negatives.strategy none"]),
        (lambda raw: raw.update(quantization="nf4"), ["set method=lora"]),
        (lambda raw: raw.update(splits={"val_fraction": 0.0}), ["rerank.k auto chooses k on validation"]),
        (lambda raw: raw["model"].update(query_prompt="q: "), ["model.query_prompt='q: ' has no effect"]),
        (lambda raw: raw.update(eval={"also": [{"path": "x.jsonl"}]}), ["eval.also=", "has no effect"]),
        (
            lambda raw: raw["retriever"].update(provider="openai_compatible", base_url="http://127.0.0.1:9/v1"),
            ["retriever.provider: a reranker recipe loads both models' weights"],
        ),
        (
            lambda raw: raw["retriever"].update(name=str(Path(raw["output"]["dir"]).parent / "finished-run")),
            ["retriever.name ", "looks like a run directory; point retriever.name at its model folder"],
        ),
    ],
    ids=["no retriever", "no negatives", "nf4 without lora", "auto k", "prompt", "eval.also", "api retriever", "run"],
)
def test_bad_reranker_recipes_are_one_line_and_write_nothing(tiny_model, tmp_path, capsys, change, expected):
    raw = reranker_recipe(tmp_path, tiny_model, tiny_model)
    (tmp_path / "finished-run" / "model").mkdir(parents=True)  # a run directory: the checkpoint is in model/
    (tmp_path / "finished-run" / "model" / "modules.json").write_text("[]")
    change(raw)
    assert main(["run", _write(tmp_path, raw)]) == 2
    line = _one_line(capsys)
    assert all(e in line for e in expected), line
    assert not (tmp_path / "runs").exists()


def test_a_classifier_with_several_labels_is_refused(tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    hf = tiny_model.parent / "hf"
    two = tmp_path / "two-labels"
    BertForSequenceClassification.from_pretrained(str(hf), num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(str(hf)).save_pretrained(two)
    assert main(["run", _write(tmp_path, reranker_recipe(tmp_path, two, tiny_model))]) == 2
    assert "classification head has 2 labels" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


# --- plan ------------------------------------------------------------------------------------------------


def test_plan_counts_one_sequence_per_pair(tiny_model, tmp_path, capsys):
    """A reranker's step is batch_size sequences (query and document in one), not anchor + positive + negatives."""
    from dataclasses import replace

    from finetune.memory.plan import estimate
    from finetune.qlora.plan import shape_of
    from finetune.recipe import validate_recipe
    from finetune.reranker.plan import setup_of

    raw = reranker_recipe(tmp_path, tiny_model, tiny_model)
    raw["train"]["batch_size"] = 32
    recipe = validate_recipe(raw)
    shape, max_len = shape_of(recipe.model)
    ours = setup_of(recipe, max_len)
    assert ours.seq_length == 96  # model.max_seq_length: the pair's length
    as_pairs = estimate(shape, "full", ours).activations
    assert as_pairs == estimate(shape, "full", replace(ours, batch_size=16, columns=2)).activations
    assert main(["plan", _write(tmp_path, raw), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "batch 32 (query, document) pairs x 96 tokens" in out and "<- the recipe" in out


def test_the_planner_runs_on_an_encoder_without_gradient_checkpointing():
    """MPNet (all-mpnet-base-v2's architecture) cannot checkpoint: the plan counts its activations unchanged."""
    import torch
    from transformers import MPNetConfig

    from finetune.memory.activations import profile

    config = MPNetConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    got = profile(config, torch.float32, 16, "full")
    assert got.total > 0 and got.checkpointed == got.total


def test_auto_checkpointing_stays_off_for_an_architecture_that_cannot(tmp_path, monkeypatch):
    """A plan that does not fit would turn checkpointing on; MPNet cannot, so the run keeps it off and says why."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    import finetune.qlora.plan as planner
    from finetune.recipe import validate_recipe

    raw_dir = tmp_path / "mpnet-hf"
    MPNetModel(MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)).save_pretrained(
        raw_dir
    )
    from families import char_tokenizer

    char_tokenizer(cls_sep=True)[0].save_pretrained(raw_dir)
    AutoTokenizer.from_pretrained(str(raw_dir))
    transformer = Transformer(str(raw_dir), max_seq_length=32)
    folder = tmp_path / "mpnet"
    SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu").save(str(folder))
    recipe = validate_recipe(
        {"kind": "qlora", "data": "construction-faq", "model": str(folder), "quantization": "none"}
    )
    monkeypatch.setattr(planner, "free_memory", lambda device: 1)  # nothing fits
    said = []
    _, _, checkpointing = planner.plan_run(recipe, "cpu", "peft", said.append)
    assert checkpointing is False
    assert any("auto -> off" in line and "cannot checkpoint" in line for line in said), said
