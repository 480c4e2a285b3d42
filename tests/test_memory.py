"""The memory planner (``finetune.memory``), the cached and Matryoshka losses, and checkpointing in every path."""

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import adapter_recipe, qlora_recipe

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.memory.activations import _count_saved, meta_encoder, profile
from finetune.memory.plan import EncoderShape, Setup, estimate, largest_fit, optimizer_bytes, weight_bytes
from finetune.qlora.backend import build_encoder, select_backend
from finetune.qlora.plan import shape_of
from finetune.recipe import validate_recipe

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _recipe(model_path, pairs_file, tmp_path, **top):
    raw = qlora_recipe({"path": str(pairs_file), "columns": COLUMNS}, model_path, tmp_path)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_recipe(raw)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _nf4_bytes(auto_model) -> int:
    """What bitsandbytes actually holds for a 4-bit model: packed weights, scales, codes, other parameters."""
    import bitsandbytes as bnb

    total = 0
    for path, module in auto_model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if "lora_" in f"{path}.{name}":
                continue
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight" and state is not None:
                total += _bytes([state.absmax, state.code])
                if state.nested:
                    total += _bytes([state.state2.absmax, state.state2.code]) + 4  # + the float32 offset
    return total


@pytest.mark.parametrize("quantization,method", [("nf4", "lora"), ("none", "lora"), ("none", "full")])
def test_planned_weight_and_lora_bytes_equal_the_built_models(tiny_model, pairs_file, tmp_path, quantization, method):
    recipe = _recipe(tiny_model, pairs_file, tmp_path, quantization=quantization, method=method)
    model, _ = build_encoder(recipe, select_backend(recipe, "cpu"))
    shape, _ = shape_of(recipe.model)
    setup = Setup(batch_size=8, seq_length=64, dtype="float32")  # a CPU run: everything in float32
    planned = weight_bytes(
        shape, {"nf4": "nf4", "none": "lora16"}[quantization] if method == "lora" else "full", setup
    )
    auto_model = model[0].auto_model
    if quantization == "nf4":
        assert planned == _nf4_bytes(auto_model)
    else:
        assert planned == _bytes(p for n, p in auto_model.named_parameters() if "lora_" not in n)
    if method == "lora":
        lora = sorted(p.numel() for n, p in auto_model.named_parameters() if "lora_" in n)
        assert sorted(shape.lora_tensors(setup)) == lora


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_optimizer_state_equals_the_optimizers(optimizer, dtype):
    import bitsandbytes as bnb

    trained = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(16, 300), (300, 16), (32,), (64, 64)]]
    make = torch.optim.AdamW if optimizer == "adamw_torch" else bnb.optim.AdamW8bit
    opt = make(trained)
    for p in trained:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = [t for s in opt.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"]
    sizes = [p.numel() for p in trained]
    assert optimizer_bytes(sizes, optimizer, trained[0].element_size()) == _bytes(state)


def test_meta_count_equals_what_real_sdpa_saves(tiny_model):
    """The meta-device count (views folded by object) equals what a real CPU forward with PyTorch's own
    SDPA kernel saves (by storage), with dropout off (with dropout the CPU takes the math kernel)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model))
    config.attention_probs_dropout_prob = config.hidden_dropout_prob = 0.0
    meta = meta_encoder(config, torch.float32)
    meta.requires_grad_(True)
    assert _count_saved(meta, 48) == _real_cpu_saves(config, 48) > 0


def _real_cpu_saves(config, seq_length: int) -> int:
    """Bytes a real CPU forward (PyTorch's own SDPA, train mode) saves for backward, by storage, weights excepted."""
    from transformers import AutoModel

    config._attn_implementation = "sdpa"
    real = AutoModel.from_config(config).train()
    seen, weights = {}, {p.untyped_storage().data_ptr() for p in real.parameters()}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(input_ids=torch.randint(5, 100, (1, seq_length)))
    return sum(v for k, v in seen.items() if k not in weights)


def test_a_cpu_plan_counts_what_real_training_with_dropout_saves(tiny_model, pairs_file, tmp_path):
    """Training with the checkpoint's dropout, a CPU takes SDPA's math kernel, which keeps every seq x seq
    matrix: the CPU plan (``attention="math"``) counts those saves; the fused count would miss them."""
    from transformers import AutoConfig

    from finetune.qlora.plan import plan_recipe

    config = AutoConfig.from_pretrained(str(tiny_model))
    config.attention_probs_dropout_prob = config.hidden_dropout_prob = 0.1
    saved = _real_cpu_saves(config, 48)
    math = profile(config, torch.float32, 48, "full", attention="math").total
    assert math == pytest.approx(saved, rel=0.02)
    assert profile(config, torch.float32, 48, "full").total < 0.9 * saved  # fused: what a GPU keeps
    assert plan_recipe(_recipe(tiny_model, pairs_file, tmp_path), "cpu").setup.attention == "math"


def test_activation_profile_checkpointing_and_lora(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model))
    full = profile(config, torch.float32, 64, "full")
    lora = profile(config, torch.float32, 64, "lora", (["query", "value"], 4))
    assert full.checkpointed < full.total and full.per_layer > 0
    assert lora.total < full.total  # frozen layers without LoRA keep nothing for their weights
    assert profile(config, torch.float32, 32, "full").total < full.total


def test_estimate_grows_with_batch_and_largest_fit_is_tight(tiny_model):
    from transformers import AutoConfig

    shape = EncoderShape(AutoConfig.from_pretrained(str(tiny_model)), dim=32)
    setup = Setup(batch_size=16, seq_length=64)
    totals = [estimate(shape, "nf4", replace(setup, batch_size=b)).total for b in (2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 3
    memory = estimate(shape, "nf4", replace(setup, batch_size=37)).total
    assert largest_fit(shape, "nf4", setup, memory) == 37
    cached = replace(setup, cached=True, mini_batch_size=1, checkpointing=True)
    assert largest_fit(shape, "nf4", cached, estimate(shape, "nf4", replace(cached, mini_batch_size=5)).total) == 5
    assert estimate(shape, "lora16", cached).activations < estimate(shape, "lora16", setup).activations
    assert largest_fit(shape, "nf4", setup, 1000) is None


def test_plan_command_prints_every_method_and_what_fits(tiny_model, pairs_file, tmp_path, capsys):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(json.dumps(qlora_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)))
    assert main(["plan", str(recipe), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("nf4 LoRA", "16-bit LoRA", "full"))]
    assert len(rows) == 3 and rows[0].endswith("<- the recipe") and all("batch" in r for r in rows)
    assert main(["plan", str(recipe), "loss.cached=true", "loss.mini_batch_size=2", "--gpu-memory", "1GiB"]) == 0
    assert "mini-batch 8" in capsys.readouterr().out  # the whole logical batch fits


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu-memory", "lots"], "--gpu-memory: 'lots' is not a memory size"),
        (["--gpu-memory", "0.0001GiB"], "cannot hold nf4 LoRA even at batch 2"),
        (["loss.cached=true", "loss.mini_batch_size=9"], "loss.mini_batch_size 9 is larger than train.batch_size 8"),
        (["loss.mini_batch_size=4"], "has no effect unless loss.cached is true"),
        (["loss.matryoshka_dims=[16,32]"], "decreasing"),
        (["train.mini_batch_size=4"], "train.mini_batch_size: unknown field (did you mean loss.mini_batch_size?)"),
    ],
)
def test_plan_bad_input_is_one_line(tiny_model, pairs_file, tmp_path, capsys, args, message):
    recipe = tmp_path / "q.yaml"
    recipe.write_text(json.dumps(qlora_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)))
    assert main(["plan", str(recipe), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_too_little_memory_says_what_fits(tiny_model, pairs_file, tmp_path):
    from finetune.qlora.plan_command import plan_table

    recipe = _recipe(tiny_model, pairs_file, tmp_path, model={"name": str(tiny_model), "max_seq_length": 64})
    shape, _ = shape_of(recipe.model)
    ckpt = estimate(shape, "nf4", Setup(batch_size=2, seq_length=64, checkpointing=True)).total
    with pytest.raises(FinetuneError, match="what fits: train.gradient_checkpointing=true train.batch_size="):
        plan_table(recipe, ckpt + 1)


def _batch_features(model):
    anchors = ["how do i fix the roof", "radon problem", "wet basement", "noisy boiler"]
    positives = ["roof expert", "radon expert", "basement pump", "boiler service"]
    return [model.preprocess(anchors), model.preprocess(positives)]


def test_gpu_benchmark_script_runs_a_tiny_shape_on_cpu(tmp_path):
    """benchmarks/memory_gpu.py's cell (build as a run does, train, record beside the plan) on a CPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory_gpu

    out = tmp_path / "cells.json"
    args = ["--device", "cpu", "--shapes", "tiny-bert", "--methods", "nf4", "--batches", "4", "--cached", "on"]
    args += ["--checkpointing", "on", "--mini-batch", "2", "--seq", "16", "--steps", "2", "--root", str(tmp_path)]
    assert memory_gpu.main([*args, "--out", str(out)]) == 0
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["result"] == "ran" and cell["predicted"]["total"] > 0 and cell["step_seconds"] > 0


@pytest.mark.parametrize("dims", [None, [32, 16]])
def test_cached_loss_equals_the_plain_loss(tiny_model, pairs_file, tmp_path, dims):
    from finetune.qlora.losses import build_loss

    grads, values = [], []
    for cached in (False, True):
        recipe = _recipe(
            tiny_model, pairs_file, tmp_path, quantization="none", loss={"cached": cached, "matryoshka_dims": dims}
        )
        torch.manual_seed(0)
        model, _ = build_encoder(recipe, select_backend(recipe, "cpu"))
        model.eval()  # no dropout: the two losses draw their dropout masks in a different order
        loss_fn = build_loss(model, recipe.loss, 2, gather=False)
        assert type(loss_fn).__name__ == (
            "MatryoshkaLoss"
            if dims
            else "CachedMultipleNegativesRankingLoss"
            if cached
            else "MultipleNegativesRankingLoss"
        )
        loss = loss_fn(_batch_features(model), labels=None)
        loss.backward()
        values.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert values[0] == pytest.approx(values[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("quantization,method", [("nf4", "lora"), ("none", "lora"), ("none", "full")])
def test_gradient_checkpointing_in_every_path(tiny_model, pairs_file, tmp_path, quantization, method):
    """Checkpointing is on in nf4 LoRA, 16-bit LoRA and full, keeps fewer activations, and changes no gradient."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    grads, saved = [], []
    for checkpointing in (False, True):
        recipe = _recipe(
            tiny_model,
            pairs_file,
            tmp_path,
            quantization=quantization,
            method=method,
            train={"gradient_checkpointing": checkpointing},
        )
        torch.manual_seed(0)
        model, _ = build_encoder(recipe, select_backend(recipe, "cpu"))
        auto_model = model[0].auto_model
        on = getattr(auto_model, "is_activation_checkpointing", None)  # the newer name, where transformers has it
        assert (auto_model.is_gradient_checkpointing if on is None else on) == checkpointing
        model.train()
        kept = {}

        def pack(t, kept=kept):
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = MultipleNegativesRankingLoss(model)(_batch_features(model), labels=None)
        loss.backward()
        saved.append(sum(kept.values()))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert saved[1] < saved[0]
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def _run(recipe, tmp_path):
    from finetune.run import run_recipe

    return json.loads((run_recipe(recipe) / "metrics.json").read_text())


def test_qlora_matryoshka_reports_each_size_and_auto_mini_batch(tiny_model, pairs_file, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    import finetune.qlora.plan as recipe_plan
    from finetune.matryoshka import truncate

    recipe = _recipe(
        tiny_model,
        pairs_file,
        tmp_path,
        loss={"cached": True, "mini_batch_size": "auto", "matryoshka_dims": [32, 8]},
        train={"max_steps": 2},
    )
    from finetune.data import load_data
    from finetune.memory.lengths import column_lengths
    from finetune.models import load_sentence_transformer
    from finetune.splits import make_splits

    data = load_data(recipe.data)  # the run plans at its data's column lengths: the room is counted at them
    model, _, prompts = load_sentence_transformer(recipe.model, "cpu")
    lengths = column_lengths(model, prompts, data, make_splits(data, recipe.splits, recipe.seed).train)
    shape, max_len = shape_of(recipe.model)
    setup = recipe_plan.setup_of(recipe, "cpu", max_len, lengths)
    room = estimate(shape, "nf4", replace(setup, mini_batch_size=3)).total / recipe_plan.AUTO_HEADROOM
    monkeypatch.setattr(recipe_plan, "free_memory", lambda device: int(room) + 1)
    metrics = _run(recipe, tmp_path)
    assert metrics["loss"] == "cached MNRL (mini-batch 3) x Matryoshka [32, 8]"
    dims = metrics["matryoshka"]
    assert set(dims["base"]) == {"32", "8"} == set(dims["tuned"])
    assert dims["base"]["32"] == pytest.approx(metrics["base"]["ndcg@10"], abs=1e-6)
    assert dims["tuned"]["32"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-6)
    assert metrics["memory_plan"]["setup"]["mini_batch_size"] == 3
    # the base row at 8 is plain sentence-transformers' embeddings, truncated
    from finetune.matryoshka import ndcg_by_dimension

    test = json.loads((next((tmp_path / "runs").iterdir()) / "splits.json").read_text())["test"]
    plain = SentenceTransformer(str(tiny_model), device="cpu")
    q = plain.encode_query([data.queries[i] for i in test], convert_to_tensor=True)
    d = plain.encode_document(list(data.corpus.values()), convert_to_tensor=True)
    assert ndcg_by_dimension(data, test, q, d, [8])["8"] == pytest.approx(dims["base"]["8"], abs=1e-6)
    assert truncate(q, 8).shape[1] == 8


def test_matryoshka_dims_larger_than_the_model_stop_before_writing(tiny_model, pairs_file, tmp_path):
    from finetune.run import run_recipe

    recipe = _recipe(tiny_model, pairs_file, tmp_path, loss={"matryoshka_dims": [64, 16]})
    with pytest.raises(FinetuneError, match="64 is larger than .* embedding dimension 32; start the list at 32"):
        run_recipe(recipe)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_adapter_matryoshka_trains_the_nested_loss_and_reports_each_size(tiny_model, pairs_file, tmp_path, cache_dir):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    raw["loss"] = {"matryoshka_dims": [32, 16, 8]}
    metrics = _run(validate_recipe(raw), tmp_path)
    dims = metrics["matryoshka"]
    assert list(dims["tuned"]) == ["32", "16", "8"]
    assert dims["tuned"]["32"] == pytest.approx(metrics["tuned"]["ndcg@10"], abs=1e-6)
    assert dims["base"]["32"] == pytest.approx(metrics["base"]["ndcg@10"], abs=1e-6)
    assert not math.isclose(dims["base"]["8"], dims["base"]["32"])


def test_plan_fetches_configs_only_and_a_run_never_takes_a_config_only_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    from finetune import models

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    calls = []

    def fake_download(hub_id, local_files_only=False, allow_patterns=None):
        calls.append((local_files_only, allow_patterns))
        if local_files_only:
            return str(snapshot)
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models._from_hub("org/model", config_only=True) == snapshot
    assert calls == [(True, models.CONFIG_FILES)]
    assert models._from_hub("org/model") is None  # the cached snapshot has no weights: download, which fails here
    assert calls[1:] == [(True, None), (False, None)]
    (snapshot / "model.safetensors").write_bytes(b"")
    assert models._from_hub("org/model") == snapshot


def test_a_failed_hub_download_is_tried_and_said_once_per_process(monkeypatch, caplog):
    """A run resolves its model several times (plan, load, export): offline, one try and one line, not three."""
    import logging

    import huggingface_hub

    from finetune import models

    calls = []

    def fake_download(hub_id, local_files_only=False, allow_patterns=None):
        calls.append(local_files_only)
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_HUB_FAILED", set())
    with caplog.at_level(logging.INFO, logger="finetune.models"):
        assert [models._from_hub("org/unreachable") for _ in range(3)] == [None] * 3
    assert calls == [True, False, True, True]  # the local cache is still read each time; the network once
    assert sum("Hub download of org/unreachable failed" in r.message for r in caplog.records) == 1


def test_meta_autocast_follows_cuda_autocast_dtype_rules():
    from finetune.memory.autocast import MetaAutocast

    linear = torch.nn.Linear(8, 8, device="meta")  # float32 weights, as full fine-tuning's masters
    norm = torch.nn.LayerNorm(8, device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 8, device="meta")
    with MetaAutocast(torch.bfloat16) as mode:
        y = linear(x)
        z = norm(y)
        w = z.pow(2)
    assert (y.dtype, z.dtype, w.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert {tuple(c.shape) for c in mode.weight_copies} == {(8, 8), (8,)}  # the weights' casts, kept apart


def test_autocast_count_is_per_sequence_and_adds_float32_norms(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model))
    half = profile(config, torch.float32, 32, "full", autocast=torch.bfloat16).total
    whole = profile(config, torch.float32, 64, "full", autocast=torch.bfloat16).total
    # linear in tokens (the pooler's one-token share aside): the weights' bf16 copies (per step) are not in it
    assert abs(whole - 2 * half) < 0.01 * whole
    assert whole > profile(config, torch.bfloat16, 64, "full").total  # BERT's LayerNorm outputs in float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_meta_count_under_emulated_autocast_equals_cuda_autocast(tiny_model):
    """On a GPU: the meta count under MetaAutocast equals the real count under torch.autocast."""
    from transformers import AutoConfig

    from finetune.memory.activations import _count_saved

    config = AutoConfig.from_pretrained(str(tiny_model))
    meta = meta_encoder(config, torch.float32)
    real = type(meta)(meta.config).cuda().train()
    real.requires_grad_(True)
    meta.requires_grad_(True)
    seen, weights = {}, {p.untyped_storage().data_ptr() for p in real.parameters()}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape)))
        return t

    ids = torch.zeros(1, 48, dtype=torch.long, device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", dtype=torch.bfloat16):
        real(input_ids=ids)
    copies = {k for k, (n, dtype, shape) in seen.items() if any(shape == tuple(p.shape) for p in real.parameters())}
    real_bytes = sum(n for k, (n, _, _) in seen.items() if k not in weights and k not in copies)
    assert _count_saved(meta, 48, torch.bfloat16) == real_bytes


def test_a_planner_failure_costs_the_gpu_run_its_plan_line_not_the_run(tiny_model, pairs_file, tmp_path, monkeypatch):
    import finetune.qlora.plan as recipe_plan

    def broken(recipe, device, data=None, lengths=None, process_bytes=None, teacher=None):  # noqa: ARG001
        raise NotImplementedError("an op without a meta kernel")

    monkeypatch.setattr(recipe_plan, "plan_recipe", broken)
    lines = []
    recipe = _recipe(tiny_model, pairs_file, tmp_path, loss={"cached": True, "mini_batch_size": 4})
    assert recipe_plan.plan_run(recipe, "cuda", "peft", lines.append) == (None, 4, False)
    assert lines == [
        "memory plan: not available for this model (NotImplementedError)",
        "train.gradient_checkpointing auto -> off (no memory plan to decide on)",
    ]
    auto = _recipe(tiny_model, pairs_file, tmp_path, loss={"cached": True, "mini_batch_size": "auto"})
    with pytest.raises(FinetuneError, match="auto needs the memory planner, which failed on this model"):
        recipe_plan.plan_run(auto, "cpu", "peft", lines.append)
    on = _recipe(tiny_model, pairs_file, tmp_path, train={"gradient_checkpointing": True})
    assert recipe_plan.plan_run(on, "cpu", "peft", lines.append) == (None, None, True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_checkpointing_auto_turns_on_only_when_the_plan_does_not_fit(
    tiny_model, pairs_file, tmp_path, monkeypatch, device
):
    """auto decides on the plan's peak against the free memory (the step's on a GPU; on a CPU, what the run adds
    to the process), says so in one line, and a plan that fits stays without checkpointing."""
    import finetune.qlora.plan as recipe_plan

    recipe = _recipe(tiny_model, pairs_file, tmp_path)
    corpus = type("Data", (), {"corpus": dict.fromkeys(range(1000))})
    plain = recipe_plan.plan_recipe(
        _recipe(tiny_model, pairs_file, tmp_path, train={"gradient_checkpointing": False}), device, corpus
    )
    need = plain.estimate.total if device == "cuda" else plain.rss()["total"] - plain.process_bytes
    for free, on in ((int(need / 0.9) + 2**20, False), (int(need / 0.9) - 2**20, True)):
        monkeypatch.setattr(recipe_plan, "free_memory", lambda device, free=free: free)
        lines = []
        plan, _, checkpointing = recipe_plan.plan_run(recipe, device, "peft", lines.append, corpus)
        assert checkpointing is on and plan.setup.checkpointing is on
        assert (plan.estimate.activations < plain.estimate.activations) is on
        assert lines[-1].startswith(f"train.gradient_checkpointing auto -> {'on' if on else 'off'}")


def test_plan_refuses_a_frozen_encoder_recipe(tiny_model, pairs_file, tmp_path, capsys):
    recipe = tmp_path / "a.yaml"
    recipe.write_text(json.dumps(adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)))
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "kind adapter trains on cached embeddings; use a kind: qlora recipe" in err and len(err.splitlines()) == 1


def test_the_plan_leaves_the_run_s_random_stream_alone(tiny_model, pairs_file, tmp_path):
    """Every qlora run plans before LoRA's initialisation draws, so a plan that drew would move it: the plan at
    the data's column lengths, and what the run then asks of it (its line, whether it can checkpoint, auto's
    reason), which count profiles the plan had not."""
    from finetune.memory.lengths import ColumnLengths
    from finetune.qlora.plan import plan_recipe, plan_run

    recipe = _recipe(tiny_model, pairs_file, tmp_path)
    torch.manual_seed(0)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    plan_recipe(recipe, "cpu")
    assert torch.equal(torch.rand(3), untouched)
    torch.manual_seed(0)
    plan, _, _ = plan_run(recipe, "cpu", "peft", lambda _: None, None, ColumnLengths(5, 9, 9))
    plan.can_checkpoint()
    assert torch.equal(torch.rand(3), untouched)


def test_each_column_is_planned_at_its_own_length(tiny_model):
    """sentence-transformers pads each column to its own longest text: a step of short queries beside long
    documents saves what each column saves at its length, which the plan counts; every text at the longest
    length (the plan without the data) overcounts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_model))
    config.attention_probs_dropout_prob = config.hidden_dropout_prob = 0.1  # a CPU's math kernel, as training
    lengths = (8, 40, 40)
    saved = sum(_real_cpu_saves(config, n) for n in lengths)
    shape = EncoderShape(config, dim=32)
    setup = Setup(batch_size=1, seq_length=40, columns=3, dtype="float32", attention="math")
    per_column = estimate(shape, "full", replace(setup, column_lengths=lengths)).activations
    assert per_column == pytest.approx(saved, rel=0.02)
    assert estimate(shape, "full", setup).activations > 1.2 * saved
    ckpt = replace(setup, column_lengths=lengths, checkpointing=True)
    assert estimate(shape, "full", ckpt).activations < per_column


def test_column_lengths_are_the_longest_training_texts_with_their_prompts(tiny_model):
    """Anchors are the training queries with the query prompt; positives only their relevant documents;
    negatives any corpus document; each cut at the model's max_seq_length."""
    from sentence_transformers import SentenceTransformer

    from finetune.data.dataset import RetrievalData
    from finetune.memory.lengths import column_lengths
    from finetune.prompts import Prompts

    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.max_seq_length = 48
    queries = {"q1": "tap", "q2": "why does the kitchen tap drip", "test": "a far longer test question " * 3}
    corpus = {"d1": "fit a washer", "d2": "call a plumber about the drip", "d3": "a long unrelated page " * 20}
    data = RetrievalData(queries, corpus, {"q1": {"d1"}, "q2": {"d2"}, "test": {"d3"}})

    def tokens(text, prompt=None):
        return model.preprocess([text], prompt=prompt)["input_ids"].shape[1]

    got = column_lengths(model, Prompts("query: ", None), data, ["q1", "q2"])
    assert got.anchor == tokens(queries["q2"], "query: ") > tokens(queries["q2"])
    assert got.positive == tokens(corpus["d2"]) < got.negative == 48
    assert got.columns(negatives=2, cap=32) == (got.anchor, got.positive, 32, 32)
    without = column_lengths(model, Prompts("query: ", None), data, ["q1", "q2"], negatives=False)
    assert (without.anchor, without.positive, without.negative) == (got.anchor, got.positive, 0)  # corpus unread


def test_a_cpu_run_checkpoints_when_it_would_take_over_a_quarter_of_the_ram(
    tiny_model, pairs_file, tmp_path, monkeypatch
):
    """On a CPU, auto's budget is the smaller of 90% of the free RAM and a quarter of the machine's: RAM is shared
    with everything else, so a run that fits the free RAM may still checkpoint. The run records the choice and
    the data's column lengths in its plan."""
    import finetune.qlora.plan as recipe_plan

    corpus = type("Data", (), {"corpus": dict.fromkeys(range(60))})
    plain = recipe_plan.plan_recipe(
        _recipe(tiny_model, pairs_file, tmp_path, train={"gradient_checkpointing": False}), "cpu", corpus
    )
    need = plain.rss()["total"] - plain.process_bytes
    monkeypatch.setattr(recipe_plan, "free_memory", lambda device: 100 * need)
    for ram, on in ((4 * need + 2**22, False), (4 * need - 2**22, True)):
        monkeypatch.setattr(recipe_plan, "machine_memory", lambda ram=ram: ram)
        lines = []
        _, _, checkpointing = recipe_plan.plan_run(
            _recipe(tiny_model, pairs_file, tmp_path), "cpu", "x", lines.append, corpus
        )
        assert checkpointing is on
        assert "a quarter of this machine's" in lines[-1]
    monkeypatch.setattr(recipe_plan, "machine_memory", lambda: 2**20)  # a run's plan, at the data's lengths
    metrics = _run(_recipe(tiny_model, pairs_file, tmp_path, train={"max_steps": 1}), tmp_path)
    assert metrics["gradient_checkpointing"] is True
    lengths = metrics["memory_plan"]["setup"]["column_lengths"]
    assert len(lengths) == 2 and lengths[0] < lengths[1]  # short questions, longer answers


def test_the_plan_reads_the_length_sentence_transformers_cuts_at(tiny_model, tmp_path):
    """sentence-transformers 6 keeps max_seq_length in the tokenizer's config, older saves in
    sentence_bert_config.json; the plan reads the length the model loads with, not the position table's size."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from finetune.config import ModelConfig

    assert not (tiny_model / "sentence_bert_config.json").is_file() or "max_seq_length" not in json.loads(
        (tiny_model / "sentence_bert_config.json").read_text()
    )
    _, max_len = shape_of(ModelConfig(name=str(tiny_model)))
    assert max_len == SentenceTransformer(str(tiny_model), device="cpu").max_seq_length == 64  # positions: 128
    older = tmp_path / "older"
    shutil.copytree(tiny_model, older)
    (older / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    assert (
        shape_of(ModelConfig(name=str(older)))[1] == SentenceTransformer(str(older), device="cpu").max_seq_length == 48
    )
