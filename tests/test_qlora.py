import json

import pytest
import torch
from conftest import fit, qlora_recipe
from sentence_transformers import SentenceTransformer

from finetune.data import load_data
from finetune.errors import FinetuneError
from finetune.qlora.backend import build_encoder, select_backend
from finetune.recipe import validate_recipe
from finetune.splits import make_splits

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _recipe(model, pairs_file, tmp_path, **top):
    raw = qlora_recipe({"path": str(pairs_file), "columns": COLUMNS}, model, tmp_path)
    raw.update(top)
    return validate_recipe(raw)


def test_backend_selection_without_cuda_or_unsloth(tiny_model, pairs_file, tmp_path):
    recipe = _recipe(tiny_model, pairs_file, tmp_path)
    choice = select_backend(recipe, "cpu")
    assert (choice.backend, choice.quantization, choice.compute_dtype) == ("peft", "nf4", torch.float32)
    assert select_backend(recipe, "cuda", cuda_available=True, unsloth_installed=True).backend == "unsloth"
    assert select_backend(recipe, "cuda", cuda_available=True, unsloth_installed=False).backend == "peft"
    assert (
        select_backend(_recipe(tiny_model, pairs_file, tmp_path, method="full", quantization="none"), "cpu").backend
        == "full"
    )


def test_explicit_unsloth_that_cannot_run_is_an_error(tiny_model, pairs_file, tmp_path):
    recipe = _recipe(tiny_model, pairs_file, tmp_path, backend="unsloth")
    with pytest.raises(FinetuneError, match="needs a CUDA GPU"):
        select_backend(recipe, "cpu")
    with pytest.raises(FinetuneError, match="not installed"):
        select_backend(recipe, "cuda", cuda_available=True, unsloth_installed=False)


@pytest.mark.parametrize(
    "top,message",
    [
        ({"method": "full"}, "set quantization=none"),
        ({"method": "full", "quantization": "none", "backend": "unsloth"}, "backend 'unsloth' is for LoRA"),
        ({"quantization": "int3"}, "quantization"),
    ],
)
def test_impossible_combinations(tiny_model, pairs_file, tmp_path, top, message):
    with pytest.raises(FinetuneError, match=message):
        _recipe(tiny_model, pairs_file, tmp_path, **top)


def test_quantized_encoder_holds_4bit_layers_and_only_lora_trains(tiny_model, pairs_file, tmp_path):
    import bitsandbytes as bnb

    recipe = _recipe(tiny_model, pairs_file, tmp_path)
    model = build_encoder(recipe, select_backend(recipe, "cpu"))[0]
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) >= 12 and all(m.weight.dtype == torch.uint8 for m in four_bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("pooler" in n for n in trainable)
    emb = model.encode(["a question"], convert_to_tensor=True)
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()


def test_only_lora_parameters_get_gradients(tiny_model, pairs_file, tmp_path):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    recipe = _recipe(tiny_model, pairs_file, tmp_path)
    model = build_encoder(recipe, select_backend(recipe, "cpu"))[0]
    model.train()
    features = [
        model.preprocess(["how do i fix the roof", "radon problem"]),
        model.preprocess(["roof expert", "radon expert"]),
    ]
    MultipleNegativesRankingLoss(model)(features, labels=None).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # lora_B starts at zero, so at step 0 only B's gradient is non-zero (A's is B^T times it)
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero and all("lora_B" in n for n in nonzero)
    assert any("lora_A" in n for n in with_grad)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from conftest import make_pairs

    from finetune.qlora.runner import QLoRARun

    tmp = tmp_path_factory.mktemp("qlora")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    recipe = _recipe(tiny_model, pairs, tmp)
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    run = QLoRARun(recipe, data, splits, "cpu")
    run_dir = tmp / "run"
    run_dir.mkdir()
    result = fit(run, run_dir)
    return run, result, run_dir, [data.queries[q] for q in splits.test]


def test_a_few_steps_lower_the_loss(trained):
    _, result, _, _ = trained
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert {"ndcg@10", "mrr@10"} <= result["base"].keys() <= result["tuned"].keys()


def test_saved_adapter_reloads_to_the_same_embeddings(trained, tiny_model):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    run, _, run_dir, texts = trained
    before = run.model.encode(texts, convert_to_tensor=True)
    fresh = build_encoder(run.recipe, run.choice)[0]
    state = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(str(run_dir / "lora" / "adapter_model.safetensors")).items()
    }
    set_peft_model_state_dict(fresh[0].auto_model, state)
    assert torch.allclose(fresh.encode(texts, convert_to_tensor=True), before, atol=1e-5)


def test_merged_model_loads_in_plain_sentence_transformers(trained, tiny_model):
    from peft import PeftModel

    run, _, run_dir, texts = trained
    merged = SentenceTransformer(str(run_dir / "model"), device="cpu")
    unmerged = build_encoder(run.recipe, run.choice, quantize=False)[0]
    unmerged[0].auto_model = PeftModel.from_pretrained(unmerged[0].auto_model, str(run_dir / "lora"))
    assert torch.allclose(
        merged.encode(texts, convert_to_tensor=True), unmerged.encode(texts, convert_to_tensor=True), atol=1e-5
    )
    # 4-bit + LoRA and its full-precision merge differ only by the quantisation error
    cos = torch.nn.functional.cosine_similarity(
        merged.encode(texts, convert_to_tensor=True), run.model.encode(texts, convert_to_tensor=True)
    )
    assert cos.min() > 0.95


def test_adapter_and_qlora_recipes_score_identical_test_queries(tiny_model, pairs_file, tmp_path):
    import yaml
    from conftest import adapter_recipe

    from finetune.cli import main

    adapter = tmp_path / "adapter.yaml"
    adapter.write_text(
        yaml.safe_dump(adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path))
    )
    assert main(["run", str(adapter), "name=a"]) == 0
    (first,) = (tmp_path / "runs").iterdir()
    qlora = tmp_path / "qlora.yaml"
    qlora.write_text(yaml.safe_dump(_recipe(tiny_model, pairs_file, tmp_path).model_dump(mode="json")))
    assert main(["run", str(qlora), "name=b", "train.max_steps=2", f"splits.file={first / 'splits.json'}"]) == 0
    (second,) = (tmp_path / "runs").glob("b-*")
    a, b = (json.loads((d / "splits.json").read_text()) for d in (first, second))
    assert a["test"] == b["test"]
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["splits"]["test"] == len(a["test"]) and metrics["document_embeddings_recomputed"] is True
    assert (second / "lora" / "adapter_config.json").is_file() and (second / "model" / "modules.json").is_file()


@pytest.mark.slow
def test_qlora_recipe_on_the_real_model_improves_the_faq(tmp_path):
    """The shipped recipe, real all-MiniLM-L6-v2 in 4-bit, FAQ, mined negatives; about 8 minutes on 2 CPU cores."""
    from finetune.cli import main

    assert main(["run", "recipes/qlora.yaml", f"output.dir={tmp_path}"]) == 0
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backend"].startswith("backend peft, device cpu, quantization nf4")
    assert metrics["tuned"]["ndcg@10"] > metrics["base"]["ndcg@10"]
