"""Cost of encoder fine-tuning at one batch size: QLoRA (nf4) vs 16-bit LoRA vs full fine-tuning.

Each configuration is a separate ``python -m finetune run recipes/qlora.yaml`` process (so peak
memory is its own) for a fixed number of steps without evaluation during training; the numbers
come from the run's ``metrics.json``: median optimizer step time (CUDA synchronised, evaluation
excluded), peak process RSS, and peak GPU memory on CUDA. Ratios are against full fine-tuning.
No target: this reports what each costs here.

    python benchmarks/qlora_cost.py                                   # CPU, peft
    python benchmarks/qlora_cost.py --device cuda --backends peft unsloth --out benchmarks/results/qlora_cost_gpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from record import write_result


def configurations(backends: list[str]) -> dict[str, list[str]]:
    out = {}
    for backend in backends:
        out[f"{backend} nf4 LoRA"] = [f"backend={backend}", "quantization=nf4"]
        out[f"{backend} 16-bit LoRA"] = [f"backend={backend}", "quantization=none"]
    out["full fine-tune"] = ["method=full", "quantization=none"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/qlora.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["peft"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as runs:
        for name, overrides in configurations(args.backends).items():
            command = [
                sys.executable,
                "-m",
                "finetune",
                "run",
                args.recipe,
                f"device={args.device}",
                f"output.dir={runs}",
                f"name=cost-{len(rows)}",
                f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size}",
                "train.eval_steps=100000",
                "train.load_best_model_at_end=false",
                *overrides,
                *([f"data={args.data}"] if args.data else []),
            ]
            print("==", name, ":", " ".join(command[2:]), flush=True)
            if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
                rows[name] = {"failed": True}
                continue
            (run_dir,) = Path(runs).glob(f"cost-{len(rows)}-*")
            m = json.loads((run_dir / "metrics.json").read_text())
            rows[name] = {
                "backend": m["backend"],
                "precision": m["precision"],
                "optimizer": m["optimizer"],
                "trainable_parameters": m["trainable_parameters"],
                "step_time": m["step_time"],
                "peak_rss_mb": m["peak_rss_mb"],
                "peak_gpu_mb": m["peak_gpu_mb"],
            }
    full = rows["full fine-tune"]
    print(f"\n{'configuration':<22}{'step s':>9}{'x full':>8}{'RSS MiB':>9}{'x full':>8}{'GPU MiB':>9}{'x full':>8}")
    for name, r in rows.items():
        if r.get("failed") or full.get("failed"):
            print(f"{name:<22} failed" if r.get("failed") else f"{name:<22} (no full run to compare)")
            continue
        r["step_ratio"] = r["step_time"]["median_s"] / full["step_time"]["median_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / full["peak_rss_mb"]
        r["gpu_ratio"] = r["peak_gpu_mb"] / full["peak_gpu_mb"] if r["peak_gpu_mb"] else None
        gpu = f"{r['peak_gpu_mb']:>9.0f}{r['gpu_ratio']:>8.2f}" if r["gpu_ratio"] else f"{'-':>9}{'-':>8}"
        print(
            f"{name:<22}{r['step_time']['median_s']:>9.3f}{r['step_ratio']:>8.2f}{r['peak_rss_mb']:>9.0f}{r['rss_ratio']:>8.2f}{gpu}"
        )
    write_result(
        "qlora_cost_" + args.device,
        {"device": args.device, "steps": args.steps, "batch_size": args.batch_size, "configurations": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
