"""Fine-tune the checkpoint you were given: its own pooling, Dense head and prompts, for every family.

Each family (see ``families.py``) is a tiny random checkpoint with what makes it easy to get wrong:
CLS pooling + Dense + prompts (BERT), ModernBERT, a Qwen3 decoder with last-token pooling, left
padding and an instruction prompt, and an EmbeddingGemma-like Gemma3 with two Dense layers.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import adapter_recipe, make_pairs, qlora_recipe
from families import FAMILIES, build_family_model
from sentence_transformers import SentenceTransformer

from finetune.cli import main
from finetune.data import load_data
from finetune.errors import FinetuneError
from finetune.evaluation import build_evaluator, evaluate
from finetune.qlora.backend import training_sample
from finetune.recipe import load_recipe
from finetune.splits import Splits

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}
TABLE_NAMES = {
    "bert_cls": {"query", "key", "value", "dense"},
    "modernbert": {"Wqkv", "Wo", "Wi"},
    "qwen3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    return tmp, pairs


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, world):
    tmp, _ = world
    return request.param, build_family_model(request.param, tmp / request.param)


def _qlora_yaml(tmp, model_path, pairs, name, **top) -> str:
    raw = qlora_recipe({"path": str(pairs), "columns": COLUMNS}, model_path, tmp, name=name, **top)
    raw["train"]["eval_steps"] = 6
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _run(recipe: str, *overrides: str):
    assert main(["run", recipe, *overrides]) == 0
    resolved = load_recipe(recipe, list(overrides))
    (run_dir,) = Path(resolved.output.dir).glob(f"{resolved.name}-*")
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _plain_score(model_path, data_source, run_dir) -> dict:
    """The shared evaluator on plain ``SentenceTransformer(path)`` with no prompt argument: its own prompts apply."""
    data = load_data(data_source)
    splits = Splits.load(run_dir / "splits.json")
    return evaluate(build_evaluator(data, splits.test, "test"), SentenceTransformer(str(model_path), device="cpu"))


@pytest.fixture(scope="module")
def qlora_run(family, world):
    fam, model = family
    tmp, pairs = world
    run_dir, metrics = _run(_qlora_yaml(tmp, model, pairs, f"q-{fam}"))
    return fam, model, run_dir, metrics


def test_base_row_is_the_plain_checkpoint(qlora_run):
    fam, model, run_dir, metrics = qlora_run
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    plain = _plain_score(model, recipe.data, run_dir)
    assert metrics["base"]["ndcg@10"] == pytest.approx(plain["ndcg@10"], abs=1e-9)
    assert metrics["base"]["mrr@10"] == pytest.approx(plain["mrr@10"], abs=1e-9)
    assert metrics["fidelity"]["min_cosine"] >= 0.9999


def test_stack_prompts_and_lora_targets_are_the_checkpoints(qlora_run):
    fam, model, run_dir, metrics = qlora_run
    plain = SentenceTransformer(str(model), device="cpu")
    assert [type(m).__name__ for m in plain] == [p.split("(")[0] for p in metrics["model"]["stack"].split(" -> ")]
    assert metrics["model"]["pooling"] == plain[1].pooling_mode
    assert {n.rsplit(".", 1)[-1] for n in metrics["model"]["lora_targets"]} == TABLE_NAMES[fam]
    assert metrics["prompts"] == {
        "query": plain.prompts.get("query") or None,
        "document": plain.prompts.get("document") or None,
    }
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_export_reloads_with_the_stack_and_prompts(qlora_run, world):
    fam, model, run_dir, metrics = qlora_run
    plain = SentenceTransformer(str(model), device="cpu")
    exported = SentenceTransformer(str(run_dir / "model"), device="cpu")
    assert [type(m).__name__ for m in exported] == [type(m).__name__ for m in plain]
    assert exported[1].pooling_mode == plain[1].pooling_mode
    saved = json.loads((run_dir / "model" / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved["query"] == (plain.prompts.get("query") or "") and saved["document"] == (
        plain.prompts.get("document") or ""
    )
    assert metrics["export"]["max_abs_diff"] <= 1e-4
    # the head was frozen: the exported Dense layers are the checkpoint's own
    for ours, theirs in zip(list(exported.children())[1:], list(plain.children())[1:]):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a, b)


def test_lora_folder_loads_onto_the_original_checkpoint(qlora_run):
    """The documented snippet: SentenceTransformer(checkpoint) + load_adapter(run/lora) == run/model."""
    fam, model, run_dir, _ = qlora_run
    texts = [r["question"] for r in make_pairs(6)]
    base = SentenceTransformer(str(model), device="cpu")
    base.load_adapter(str(run_dir / "lora"))
    merged = SentenceTransformer(str(run_dir / "model"), device="cpu")
    a, b = base.encode_query(texts, convert_to_tensor=True), merged.encode_query(texts, convert_to_tensor=True)
    assert torch.allclose(a, b, atol=1e-4)


def test_adapter_recipe_scores_and_exports_the_plain_checkpoint(family, world):
    fam, model = family
    tmp, pairs = world
    raw = adapter_recipe({"path": str(pairs), "columns": COLUMNS}, model, tmp, name=f"a-{fam}")
    recipe = tmp / f"a-{fam}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run_dir, metrics = _run(str(recipe))
    plain = _plain_score(model, load_recipe(str(recipe)).data, run_dir)
    assert metrics["base"]["ndcg@10"] == pytest.approx(plain["ndcg@10"], abs=1e-6)
    saved = json.loads((run_dir / "model" / "config_sentence_transformers.json").read_text())["prompts"]
    checkpoint = SentenceTransformer(str(model), device="cpu").prompts
    assert saved["query"] == (checkpoint.get("query") or "") and saved["document"] == (
        checkpoint.get("document") or ""
    )


def test_the_old_rebuild_would_have_changed_a_cls_checkpoint(world):
    """Rebuilding as Transformer -> mean Pooling -> Normalize (the old behaviour) is another model; ours is not."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    from finetune.qlora.backend import build_encoder, select_backend
    from finetune.recipe import validate_recipe

    tmp, pairs = world
    model = build_family_model("bert_cls", tmp / "cls-only")
    plain = SentenceTransformer(str(model), device="cpu")
    old = SentenceTransformer(
        modules=[plain[0], Pooling(plain[0].get_embedding_dimension(), "mean"), Normalize()], device="cpu"
    )
    texts = [r["question"] for r in make_pairs(8)]
    want = plain.encode_query(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(old.encode(texts, convert_to_tensor=True)[:, :16], want).min() < 0.99
    recipe = validate_recipe(
        {"kind": "qlora", "model": {"name": str(model)}, "data": {"path": str(pairs), "columns": COLUMNS}}
    )
    ours, _ = build_encoder(recipe, select_backend(recipe, "cpu"), quantize=False)
    assert torch.allclose(ours.encode_query(texts, convert_to_tensor=True), want, atol=1e-6)


def test_fidelity_check_names_the_first_module_that_differs(world):
    from finetune.qlora.stack import check_fidelity

    tmp, _ = world
    model = build_family_model("gemma3", tmp / "gemma-fidelity")
    plain, built = (SentenceTransformer(str(model), device="cpu") for _ in range(2))
    texts = [r["question"] for r in make_pairs(4)]
    assert check_fidelity(built, plain, texts, texts)["min_cosine"] > 0.9999
    with torch.no_grad():
        built[3].linear.weight.mul_(-1.5)  # the second Dense layer
    with pytest.raises(FinetuneError, match=r"module 3 \(Dense\) gives other outputs"):
        check_fidelity(built, plain, texts, texts)


def test_explicit_pooling_overrides_and_is_reported(world, capsys):
    tmp, pairs = world
    model = build_family_model("bert_cls", tmp / "cls-override")
    run_dir, metrics = _run(_qlora_yaml(tmp, model, pairs, "q-override", pooling="mean"), "train.max_steps=2")
    assert metrics["model"]["pooling"] == "mean" and metrics["model"]["checkpoint_pooling"] == "cls"
    assert "pooling mean (recipe; the checkpoint's is cls" in capsys.readouterr().out
    assert SentenceTransformer(str(run_dir / "model"), device="cpu")[1].pooling_mode == "mean"
    plain = _plain_score(model, load_recipe(str(run_dir / "recipe.yaml")).data, run_dir)
    assert metrics["base"]["ndcg@10"] == pytest.approx(plain["ndcg@10"], abs=1e-9)  # base keeps the checkpoint's
    data = load_data(load_recipe(str(run_dir / "recipe.yaml")).data)
    queries, documents = training_sample(data, Splits.load(run_dir / "splits.json").train)
    assert metrics["fidelity"]["texts"] == len(queries) + len(documents) > len(queries)


def test_recipe_prompts_override_the_checkpoints_everywhere(world):
    tmp, pairs = world
    model = build_family_model("bert_cls", tmp / "cls-prompts")
    recipe = _qlora_yaml(
        tmp,
        model,
        pairs,
        "q-prompts",
        model={"name": str(model), "batch_size": 16, "query_prompt": "", "document_prompt_name": "query"},
    )
    run_dir, metrics = _run(recipe, "train.max_steps=2")
    assert metrics["prompts"] == {"query": None, "document": "query: "}
    data, splits = load_data(load_recipe(recipe).data), Splits.load(run_dir / "splits.json")
    evaluator = build_evaluator(data, splits.test, "test", query_prompt="", corpus_prompt="query: ")
    assert metrics["base"]["ndcg@10"] == pytest.approx(
        evaluate(evaluator, SentenceTransformer(str(model), device="cpu"))["ndcg@10"], abs=1e-9
    )
    assert json.loads((run_dir / "model" / "config_sentence_transformers.json").read_text())["prompts"] == {
        "query": "",
        "document": "query: ",
    }


def test_train_head_trains_the_dense_layers(world):
    tmp, pairs = world
    model = build_family_model("gemma3", tmp / "gemma-head")
    run_dir, metrics = _run(_qlora_yaml(tmp, model, pairs, "q-head", lora={"train_head": True}), "train.max_steps=4")
    assert metrics["model"]["head_trained"] and metrics["export"]["max_abs_diff"] <= 1e-4
    plain, exported = (SentenceTransformer(str(p), device="cpu") for p in (model, run_dir / "model"))
    assert not torch.equal(exported[2].linear.weight, plain[2].linear.weight)


def test_auto_targets_fall_back_to_every_linear_layer_but_heads():
    from transformers import BertConfig, BertModel

    from finetune.lora_targets import auto_targets

    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    names, rule = auto_targets(model, "some-new-architecture")
    assert rule == "all-linear fallback" and names and not any("pooler" in n for n in names)
    assert len(names) == 6  # query, key, value, attention output, intermediate, output


def test_plain_hugging_face_folder_gets_mean_pooling_and_says_so(world, caplog):
    """A folder without modules.json: sentence-transformers' own default (mean pooling), with one line saying so."""
    tmp, pairs = world
    hf_folder = build_family_model("modernbert", tmp / "plain-hf").parent / "hf"  # the raw transformers save
    assert not (hf_folder / "modules.json").exists()
    with caplog.at_level("WARNING"):
        run_dir, metrics = _run(_qlora_yaml(tmp, hf_folder, pairs, "q-plain-hf"), "train.max_steps=2")
    assert "has no modules.json: sentence-transformers' default stack (mean pooling) is assumed" in caplog.text
    assert metrics["model"]["pooling"] == "mean"


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_picks_the_last_real_token_on_either_padding_side(world, side):
    """A decoder embedder: the training stack pools the EOS the tokenizer appends, whatever the padding side."""
    from finetune.qlora.backend import build_encoder, select_backend
    from finetune.recipe import validate_recipe

    tmp, pairs = world
    model = build_family_model("qwen3", tmp / f"qwen3-{side}")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(dict(config, padding_side=side)))
    recipe = validate_recipe(
        {"kind": "qlora", "model": {"name": str(model)}, "data": {"path": str(pairs), "columns": COLUMNS}}
    )
    ours, _ = build_encoder(recipe, select_backend(recipe, "cpu"), quantize=False)
    assert ours.tokenizer.padding_side == side and ours[1].pooling_mode == "lasttoken"
    features = ours.preprocess(["ab", "a much longer text"])
    eos = ours.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lengths = features["attention_mask"].sum(1)
    last = [row[mask.bool()][-1].item() for row, mask in zip(features["input_ids"], features["attention_mask"])]
    assert last == [eos, eos] and lengths[0] < lengths[1]
    alone = ours.encode_query(["ab"], convert_to_tensor=True)
    padded = ours.encode_query(["ab", "a much longer text"], convert_to_tensor=True)[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
