"""The qlora recipe on a CUDA GPU: peft and unsloth backends, 4-bit and 16-bit LoRA, full fine-tuning.

Run with ``pytest -m gpu`` on a machine with a CUDA GPU (skipped elsewhere); tiny BERT, seconds each.
"""

import importlib.util
import json

import pytest
import torch
from conftest import fit, qlora_recipe
from sentence_transformers import SentenceTransformer

from finetune.data import load_data
from finetune.qlora.backend import build_encoder
from finetune.recipe import validate_recipe
from finetune.splits import make_splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None
CASES = [
    ("peft", "lora", "nf4"),
    ("peft", "lora", "none"),
    ("peft", "full", "none"),
    pytest.param("unsloth", "lora", "nf4", marks=pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")),
    pytest.param("unsloth", "lora", "none", marks=pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")),
]


def _fit(tiny_model, pairs_file, tmp_path, backend, method, quantization):
    from finetune.qlora.runner import QLoRARun

    recipe = validate_recipe(
        qlora_recipe(
            {"path": str(pairs_file), "columns": COLUMNS},
            tiny_model,
            tmp_path,
            name="gpu",
            device="cuda",
            backend=backend,
            method=method,
            quantization=quantization,
        )
    )
    data = load_data(recipe.data)
    splits = make_splits(data, recipe.splits, recipe.seed)
    run = QLoRARun(recipe, data, splits, "cuda")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run, fit(run, run_dir), run_dir, [data.queries[q] for q in splits.test]


@pytest.mark.parametrize("backend, method, quantization", CASES)
def test_training_on_cuda(tiny_model, pairs_file, tmp_path, backend, method, quantization):
    run, result, run_dir, texts = _fit(tiny_model, pairs_file, tmp_path, backend, method, quantization)
    expected = "full" if method == "full" else backend
    assert result["backend"].startswith(f"backend {expected}, device cuda, quantization {quantization}")
    assert result["precision"] in ("bf16", "fp16") and result["optimizer"] == "adamw_8bit"
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert result["peak_gpu_mb"] > 0 and result["step_time"]["steps_timed"] == 12

    weights = [p for n, p in run.model.named_parameters() if "lora_" not in n]
    assert all(p.device.type == "cuda" for p in weights)
    if quantization == "nf4":
        import bitsandbytes as bnb

        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules()) >= 12
    elif method == "lora":  # 16-bit LoRA: the frozen base is stored in 16 bits, the adapters train in fp32
        assert {p.dtype for n, p in run.model.named_parameters() if "encoder" in n and "lora_" not in n} <= {
            torch.bfloat16,
            torch.float16,
        }

    merged = SentenceTransformer(str(run_dir / "model"), device="cuda")
    cos = torch.nn.functional.cosine_similarity(
        merged.encode(texts, convert_to_tensor=True).float(), run.model.encode(texts, convert_to_tensor=True).float()
    )
    assert cos.min() > (0.95 if quantization == "nf4" else 0.99)
    if method == "lora":
        assert json.loads((run_dir / "lora" / "adapter_config.json").read_text())["r"] == 16


def test_base_reference_is_the_same_for_every_backend(tiny_model, pairs_file, tmp_path):
    """``base`` is scored with the full-precision encoder, whichever backend then trains."""
    from conftest import make_pairs

    from finetune.qlora.backend import select_backend

    recipe = validate_recipe(
        {"kind": "qlora", "model": {"name": str(tiny_model)}, "data": {"path": str(pairs_file), "columns": COLUMNS}}
    )
    texts = [r["question"] for r in make_pairs(20)]
    peft = select_backend(recipe, "cuda", cuda_available=True, unsloth_installed=False)
    unsloth = select_backend(recipe, "cuda", cuda_available=True, unsloth_installed=True)
    assert (peft.backend, unsloth.backend) == ("peft", "unsloth")
    a, b = (build_encoder(recipe, c, quantize=False)[0].encode(texts, convert_to_tensor=True) for c in (peft, unsloth))
    assert a.device.type == "cuda" and torch.equal(a, b)
    cpu = build_encoder(recipe, select_backend(recipe, "cpu"), quantize=False)[0].encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(a.cpu(), cpu).min() > 0.999


FAMILY_CASES = [
    (family, backend)
    for family in ("bert_cls", "modernbert", "qwen3", "gemma3")
    for backend in (
        "peft",
        pytest.param("unsloth", marks=pytest.mark.skipif(not HAS_UNSLOTH, reason="unsloth not installed")),
    )
]


@pytest.mark.parametrize("family, backend", FAMILY_CASES)
def test_checkpoint_families_keep_their_stack_on_cuda(family, backend, tmp_path):
    """Each family trains in nf4 on the GPU with its own pooling, head and prompts, and exports them."""
    from conftest import make_pairs
    from families import build_family_model

    model = build_family_model(family, tmp_path / family)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    run, result, run_dir, texts = _fit(model, pairs, tmp_path, backend, "lora", "nf4")
    plain = SentenceTransformer(str(model), device="cuda")
    assert result["backend"].startswith(f"backend {backend}, device cuda, quantization nf4")
    assert result["model"]["stack"].split(" -> ")[0].startswith("Transformer") and result["model"]["lora_targets"]
    assert [type(m).__name__ for m in SentenceTransformer(str(run_dir / "model"), device="cuda")] == [
        type(m).__name__ for m in plain
    ]
    assert result["fidelity"]["min_cosine"] >= 0.9999 and result["export"]["max_abs_diff"] <= 1e-3
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_a_qwen3_0_6b_shaped_embedder_trains_in_4bit(tmp_path):
    """Full Qwen3-Embedding-0.6B shape, random weights, last-token pooling: a few nf4 LoRA steps on the GPU."""
    from conftest import make_pairs
    from families import QWEN3_0_6B, build_family_model

    model = build_family_model("qwen3", tmp_path / "qwen3-0.6b", shape=QWEN3_0_6B)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    run, result, run_dir, _ = _fit(model, pairs, tmp_path, "peft", "lora", "nf4")
    assert result["total_parameters"] > 5e8 and result["model"]["pooling"] == "lasttoken"
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    print(f"qwen3-0.6b shape: peak GPU {result['peak_gpu_mb']:.0f} MiB, step {result['step_time']}")
