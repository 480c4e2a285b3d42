"""The planner's weight and optimizer bytes against real tensors, for every full-size shape, on a CPU.

Memory does not depend on weight values, so each shape (:mod:`memory_shapes`) is built for real
in bf16 (uninitialised memory, then random values where they are quantised) and measured:

- nf4: every Linear weight quantised by bitsandbytes (``quantize_4bit``, NF4, double
  quantisation, block 64): packed bytes + scales + codes; the other parameters in bf16;
- 16-bit LoRA: the bf16 parameters;
- full: the float32 master copies (autocast's bf16 copies exist on a GPU only: not measured);
- LoRA: ``add_adapter`` with the toolkit's auto targets and r 16, its tensors and their gradients;
- optimizer: bitsandbytes ``AdamW8bit`` and torch ``AdamW`` state after one step, measured once
  per distinct tensor shape and multiplied by how many tensors have it;
- activations: one sequence of 512 tokens through the real bf16 model with PyTorch's own SDPA
  kernel, every tensor autograd saves counted once by its storage, for full fine-tuning and for
  LoRA, against the planner's meta-device count (same dtype, no autocast: a CPU has no CUDA
  autocast; dropout off, because with dropout the CPU falls back to the math attention kernel,
  which keeps the seq x seq scores that GPU kernels do not).

Each is printed beside :mod:`finetune.memory.plan`'s prediction for a GPU run (bf16, 8-bit AdamW).

    python benchmarks/memory_cpu.py                 # every shape -> results/memory_cpu.json
    python benchmarks/memory_cpu.py --shapes bert-base qwen3-0.6b
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_shapes import SHAPES, config_of  # noqa: E402
from record import write_result  # noqa: E402

from finetune.memory.plan import EncoderShape, Setup, trainable_bytes, weight_bytes  # noqa: E402


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4_bytes(weight: torch.Tensor) -> int:
    """What bitsandbytes stores for one NF4 weight with double quantisation."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    return _nbytes(packed, state.absmax, state.code, state.state2.absmax, state.state2.code) + 4  # + offset


def optimizer_state(shapes: Counter, eight_bit: bool, dtype: torch.dtype) -> int:
    """Optimizer state after one step, per distinct shape, times its count."""
    import bitsandbytes as bnb

    total = 0
    for shape, count in shapes.items():
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.zeros_like(p)
        optimizer = bnb.optim.AdamW8bit([p]) if eight_bit else torch.optim.AdamW([p])
        optimizer.step()
        state = [v for k, v in optimizer.state[p].items() if torch.is_tensor(v) and k != "step"]
        total += count * _nbytes(*state)
    return total


def measure(name: str) -> dict:
    """Real tensor bytes of shape ``name`` by part."""
    from peft import LoraConfig
    from transformers import AutoModel

    from finetune.lora_targets import auto_targets

    config = config_of(name)
    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")  # real, uninitialised: sizes are what is measured
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {"lora16_weights": 0, "nf4_weights": 0, "full_masters": 0}
    generator = torch.Generator().manual_seed(0)
    for pname, p in model.named_parameters():
        out["lora16_weights"] += _nbytes(p)
        out["full_masters"] += _nbytes(p.float())
        if pname in linear:
            out["nf4_weights"] += nf4_bytes(torch.randn(p.shape, generator=generator, dtype=torch.bfloat16))
        else:
            out["nf4_weights"] += _nbytes(p)  # unquantised parameters stay in the compute dtype (bf16)
    full_shapes = Counter(tuple(p.shape) for p in model.parameters())
    out["full_grads_and_adamw_8bit"] = out["full_masters"] + optimizer_state(full_shapes, True, torch.float32)
    targets, _ = auto_targets(model, config.model_type)
    model.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    lora_shapes = Counter(tuple(p.shape) for p in lora)
    out["lora_dtype"] = str(lora[0].dtype).removeprefix("torch.")
    out["lora_grads_and_adamw_8bit"] = 2 * _nbytes(*lora) + optimizer_state(lora_shapes, True, lora[0].dtype)
    out["lora_grads_and_adamw_torch"] = 2 * _nbytes(*lora) + optimizer_state(lora_shapes, False, lora[0].dtype)
    out["parameters"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return out


NO_DROPOUT = ("attention_probs_dropout_prob", "hidden_dropout_prob", "attention_dropout", "embedding_dropout",
              "mlp_dropout")  # fmt: skip


def saved_bytes(name: str, trainable: str, seq: int = 512) -> tuple[int, int]:
    """(real, planned) bytes autograd keeps for one sequence, ``trainable`` = full or lora."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModel

    from finetune.lora_targets import auto_targets
    from finetune.memory.activations import profile

    gc.collect()  # the previous check's model, before this one is built
    config = config_of(name, seq)
    for field in NO_DROPOUT:
        if hasattr(config, field):
            setattr(config, field, 0.0)
    config._attn_implementation = "sdpa"
    from transformers.initialization import no_init_weights

    with no_init_weights():  # values do not change what is saved; buffers (position ids) are built as usual
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    targets, _ = auto_targets(model, config.model_type)
    model.requires_grad_(trainable == "full")
    if trainable == "lora":
        model = inject_adapter_in_model(LoraConfig(r=16, target_modules=targets), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(4, 1000, (1, seq)))
    real = sum(v for k, v in seen.items() if k not in weights)
    planned = profile(config, torch.bfloat16, seq, trainable, (targets, 16) if trainable == "lora" else None).total
    return real, planned


def predict(name: str) -> dict:
    config = config_of(name)
    shape = EncoderShape(config, config.hidden_size, name)
    gpu = Setup(batch_size=32, seq_length=512)  # bf16, 8-bit AdamW: what a GPU run uses
    return {
        "lora16_weights": weight_bytes(shape, "lora16", gpu),
        "nf4_weights": weight_bytes(shape, "nf4", gpu),
        "full_masters": weight_bytes(shape, "full", Setup(32, 512, dtype="float32")),  # without autocast copies
        "full_grads_and_adamw_8bit": trainable_bytes(shape, "full", gpu),
        "lora_grads_and_adamw_8bit": trainable_bytes(shape, "lora16", gpu),
        "lora_grads_and_adamw_torch": trainable_bytes(shape, "lora16", replace(gpu, optimizer="adamw_torch")),
        "parameters": shape.parameters,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny-bert"])
    parser.add_argument("--name", default="memory_cpu")
    parser.add_argument("--activations", nargs="*", default=["full", "lora"], help="saved-tensor checks to run")
    args = parser.parse_args(argv)
    rows = {}
    print(f"{'shape':<18}{'part':<28}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>8}")
    for name in args.shapes:
        checks = {t: saved_bytes(name, t) for t in args.activations}  # first, while memory is free
        gc.collect()
        got, want = measure(name), predict(name)
        gc.collect()  # the measured model (peft keeps reference cycles) before the next one is built
        for trainable, (real, planned) in checks.items():
            got[f"activations_{trainable}"], want[f"activations_{trainable}"] = real, planned
        rows[name] = {"measured": got, "planned": want}
        for part, value in want.items():
            if part == "parameters":
                continue
            ratio = got[part] / value if value else math.nan
            print(f"{name:<18}{part:<28}{got[part] / 2**20:>14.1f}{value / 2**20:>13.1f}{ratio:>8.4f}", flush=True)
        write_result(args.name, {"shapes": rows})  # after every shape: a later one running out of memory loses none
    return 0


if __name__ == "__main__":
    sys.exit(main())
