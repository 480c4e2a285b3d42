"""Peak GPU memory and step time of encoder training on full-size model shapes, beside the planner's prediction.

For each shape (random weights, :mod:`memory_shapes`), method (nf4 LoRA, 16-bit LoRA, full),
loss (MNRL or cached MNRL), gradient checkpointing off/on and logical batch (32, 128): the
toolkit's own ``build_encoder`` builds the model exactly as a run does, then a few training
steps run the way ``SentenceTransformerTrainer`` runs them (bf16 autocast, the recipe's loss,
8-bit AdamW, gradient clipping) on (anchor, positive) pairs of ``--seq`` tokens each, no padding.
Recorded per cell: ``torch.cuda.max_memory_allocated``, the planner's prediction and their
ratio, the median step time, and model-FLOPs utilisation (6 x parameters x tokens / step
time / the GPU's dense bf16 peak). A cell that runs out of memory is recorded as such.

    python benchmarks/memory_gpu.py                      # every shape; results/memory_gpu_<gpu>.json
    python benchmarks/memory_gpu.py --shapes qwen3-4b --methods nf4 --batches 128 --cached on

Cells are appended to the result file as they finish, so a long grid can be split over several
commands (each under the device's 10-minute limit); ``--device cpu --shapes tiny-bert`` is the
smoke test that CI runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_shapes import SHAPES, config_of, random_checkpoint  # noqa: E402
from record import RESULTS, write_result  # noqa: E402

from finetune.memory.plan import EncoderShape, Setup, estimate  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a name fragment of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}
METHODS = {"nf4": ("lora", "nf4"), "lora16": ("lora", "none"), "full": ("full", "none")}


def recipe_for(folder: Path, method: str, batch: int, cached: bool, mini: int, checkpointing: bool, seq: int):
    from finetune.recipe import validate_recipe

    kind, quantization = METHODS[method]
    return validate_recipe(
        {
            "kind": "qlora",
            "model": {"name": str(folder), "max_seq_length": seq},
            "data": "construction-faq",  # not read: the benchmark feeds token ids
            "method": kind,
            "quantization": quantization,
            "loss": {"cached": cached, **({"mini_batch_size": mini} if cached else {})},
            "train": {"batch_size": batch, "gradient_checkpointing": checkpointing},
        }
    )


def predicted(name: str, method: str, batch: int, cached: bool, mini: int, checkpointing: bool, seq: int) -> dict:
    config = config_of(name, seq)
    setup = Setup(batch, seq, checkpointing=checkpointing, cached=cached, mini_batch_size=mini)
    return estimate(EncoderShape(config, config.hidden_size, name), method, setup).as_dict()


def _features(batch: int, seq: int, device: str) -> list[dict]:
    ids = torch.randint(4, 6, (batch, seq), device=device)  # any id below every shape's vocabulary
    mask = torch.ones_like(ids)
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids.flip(0), "attention_mask": mask}]


def build(name: str, method: str, seq: int, device: str, root):
    """The shape's random checkpoint, built by the toolkit as a run builds it (peft path, no checkpointing yet)."""
    from finetune.qlora.backend import build_encoder, select_backend

    recipe = recipe_for(random_checkpoint(name, root, device, seq), method, 32, False, 16, False, seq)
    model, _ = build_encoder(recipe, select_backend(recipe, device, unsloth_installed=False))
    return model.train()  # build_encoder placed it (a 4-bit model cannot be moved after loading)


def measure(model, batch, cached, mini, checkpointing, seq, steps, device) -> dict:
    """One cell on a built model: ``steps`` training steps; peak memory (from the model alone) and step times."""
    from finetune.memory.activations import set_checkpointing
    from finetune.qlora.config import EncoderLossConfig
    from finetune.qlora.losses import build_loss

    set_checkpointing(model[0].auto_model, checkpointing)
    loss_fn = build_loss(model, EncoderLossConfig(cached=cached, mini_batch_size=mini), mini, gather=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    features, times = _features(batch, seq, device), []
    if device == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trained, lr=1e-5)
        torch.cuda.reset_peak_memory_stats()  # from here: weights + this cell's step
    else:
        optimizer = torch.optim.AdamW(trained, lr=1e-5)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    try:
        for _ in range(steps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss = loss_fn(features, labels=None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"peak_bytes": peak, "step_seconds": times}


def mfu(parameters: int, tokens: int, seconds: float) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return 6 * parameters * tokens / seconds / (peak * 1e12) if peak else None


def predict_grid(args) -> int:
    """Write the planner's prediction for every cell; print them as a markdown table (GiB, nf4 LoRA /
    16-bit LoRA / full) and the range of nf4 LoRA over full for models of 300M parameters or more."""
    cells, ratios = [], {}
    combos = [(c == "on", k == "on") for c in args.cached for k in args.checkpointing]
    print("| shape | batch | " + " | ".join(f"cached {c}, checkpointing {k}" for c, k in combos) + " |")
    print("|---|---|" + "---|" * len(combos))
    for name in args.shapes:
        big = EncoderShape(config_of(name), 1).parameters >= 300e6 if "full" in args.methods else False
        for batch in args.batches:
            row = []
            for cached, ckpt in combos:
                mini = args.mini_batch if cached else None
                got = {m: predicted(name, m, batch, cached, mini, ckpt, args.seq) for m in args.methods}
                cells += [
                    dict(shape=name, method=m, batch=batch, cached=cached, checkpointing=ckpt, seq=args.seq,
                         mini_batch=mini, predicted=p)
                    for m, p in got.items()
                ]  # fmt: skip
                row.append(" / ".join(f"{p['total'] / 2**30:.1f}" for p in got.values()))
                if big and "nf4" in got:
                    ratios.setdefault((cached, ckpt), []).append(got["nf4"]["total"] / got["full"]["total"])
            print(f"| {name} | {batch} | " + " | ".join(row) + " |")
    for (cached, ckpt), r in ratios.items():
        print(f"nf4 / full, >= 300M parameters, cached {cached}, checkpointing {ckpt}: {min(r):.2f} to {max(r):.2f}")
    write_result(Path(args.out).stem if args.out else "memory_plan_predicted", {"cells": cells}, args.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny-bert"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--cached", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--mini-batch", type=int, default=16, help="the cached loss's mini-batch (default 16)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="steps per cell; the first is not timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", default=None, help="where the random checkpoints go (default: a temp folder)")
    parser.add_argument("--out", default=None, help="result JSON (default results/memory_gpu_<device>.json)")
    parser.add_argument(
        "--predict-only", action="store_true", help="the planner's predictions for the grid, no model built"
    )
    args = parser.parse_args(argv)
    if args.predict_only:
        return predict_grid(args)
    gpu = "cpu"
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        gpu = next((k for k in PEAK_TFLOPS if k in name), re.sub(r"\W+", "_", name))
    out = Path(args.out) if args.out else RESULTS / f"memory_gpu_{gpu.lower()}.json"
    cells = json.loads(out.read_text())["cells"] if out.is_file() else []
    root = args.root or tempfile.mkdtemp(prefix="shapes-")
    for name in args.shapes:
        for method in args.methods:
            model = build(name, method, args.seq, args.device, root)
            parameters = sum(
                p.numel() * (2 if p.dtype == torch.uint8 else 1)
                for n, p in model.named_parameters()
                if "lora_" not in n
            )
            for batch in args.batches:
                for cached in (c == "on" for c in args.cached):
                    for ckpt in (c == "on" for c in args.checkpointing):
                        key = dict(shape=name, method=method, batch=batch, cached=cached, checkpointing=ckpt)
                        mini = args.mini_batch if cached else None
                        cell = {**key, "seq": args.seq, "mini_batch": mini, "parameters": parameters}
                        cell["predicted"] = predicted(name, method, batch, cached, mini, ckpt, args.seq)
                        try:
                            got = measure(model, batch, cached, mini, ckpt, args.seq, args.steps, args.device)
                        except torch.cuda.OutOfMemoryError:
                            cell["result"] = "out of memory"
                        else:
                            step = statistics.median(got["step_seconds"][1:] or got["step_seconds"])
                            tokens = batch * 2 * args.seq
                            cell.update(result="ran", step_seconds=step, peak_bytes=got["peak_bytes"])
                            cell["mfu"] = mfu(parameters, tokens, step)
                            if got["peak_bytes"]:
                                cell["measured_over_predicted"] = got["peak_bytes"] / cell["predicted"]["total"]
                        model.zero_grad(set_to_none=True)
                        gc.collect()
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                        cells = [c for c in cells if {k: c[k] for k in key} != key] + [cell]
                        print(json.dumps({k: v for k, v in cell.items() if k != "predicted"}), flush=True)
                        write_result(out.stem, {"cells": cells}, out)
            del model
            gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
