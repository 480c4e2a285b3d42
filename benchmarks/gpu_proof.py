"""The GPU proof: one prepared command that checks on a CUDA GPU what no CPU machine can, in under 9 minutes.

Stages, each under its own time cap, each writing its JSON to OUT as soon as it ends (a stage that
fails or runs out of time says so in its file, and the next stage still runs):

- ``gpu_env.json``: the machine, versions, and the bundle's installation (``benchmarks/gpu_wheels.py``
  made the bundle: wheels the image lacks, and all-MiniLM-L6-v2 with bfloat16 weights, cast back to
  float32 here before use).
- ``gpu_pytest.json`` (a): ``pytest -m gpu``, its counts and the tail of its output.
- ``gpu_memory.json`` (b): ``memory_gpu.py`` on the bert-base, ModernBERT-base and Qwen3-0.6B shapes (nf4
  LoRA, 16-bit LoRA and full, cached loss off and on, batch 32 x 512), then the Qwen3-4B shape in nf4
  LoRA at logical batch 128 x 512 (cached loss, checkpointing): measured peak against the planner,
  step time, MFU, and the two targets (within 15% of the plan; Qwen3-4B under 16 GiB).
- ``gpu_faq.json`` (c): ``recipes/qlora.yaml`` in nf4 and 16-bit LoRA, and ``recipes/full.yaml``, on the FAQ
  and the packaged model, one splits file: test NDCG@10, step time, peak GPU memory.
- ``gpu_unsloth.json`` (d): the nf4 recipe again with ``backend=unsloth`` on the same splits, paired against
  peft's run (the interval of the per-query difference), and the step-time ratio; or why it did not run.

    python3 benchmarks/gpu_proof.py OUT                  # on the GPU machine, with .gpu_proof carried
    python benchmarks/gpu_proof.py OUT --dry-run          # on a CPU: tiny shapes and model, no CUDA, ~1 minute

``--dry-run`` runs every stage with tiny shapes, a tiny random model and two training steps, so the
script cannot rot unnoticed (``tests/test_gpu_proof.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the GPU machine runs the project from its checkout, not installed
# seconds per stage: 525 in all, and about 30 more to check the imports and cast the model, under the
# device's 10-minute limit per command
CAPS = {"setup": 30, "pytest": 45, "memory": 210, "faq": 165, "unsloth": 75}
FAQ_RUNS = {  # name -> recipe and overrides; nf4 first: the unsloth stage pairs against it
    "nf4": ("recipes/qlora.yaml", []),
    "lora16": ("recipes/qlora.yaml", ["quantization=none"]),
    "full": ("recipes/full.yaml", []),
}
MEMORY_GRID = [
    ["--shapes", "bert-base", "modernbert-base", "qwen3-0.6b", "--methods", "nf4", "lora16", "full"]
    + ["--batches", "32", "--cached", "off", "on", "--checkpointing", "off"],
    ["--shapes", "qwen3-4b", "--methods", "nf4", "--batches", "128", "--cached", "on", "--checkpointing", "on"],
]
DRY_MEMORY_GRID = [
    ["--shapes", "tiny-bert", "--methods", "nf4", "lora16", "full", "--batches", "4", "--cached", "off", "on"]
    + ["--checkpointing", "off", "--seq", "32", "--steps", "2", "--device", "cpu"],
    ["--shapes", "tiny-bert", "--methods", "nf4", "--batches", "8", "--cached", "on", "--checkpointing", "on"]
    + ["--seq", "32", "--steps", "2", "--device", "cpu"],
]
PLAN_TOLERANCE, QWEN3_4B_LIMIT_GIB = 0.15, 16
STAGES = ("pytest", "memory", "faq", "unsloth")


class Proof:
    """Runs the stages in order against one deadline; ``command`` runs a subprocess under a stage's cap."""

    def __init__(self, out: Path, work: Path, dry_run: bool):
        self.out, self.work, self.dry_run = out, work, dry_run
        path = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
        # the dry run's caps are the GPU's times four: the same stages on 2 CPU cores, bounded all the same
        self.caps = {k: v * (4 if dry_run else 1) for k, v in CAPS.items()}

    def command(self, args: list[str], cap: float) -> dict:
        t0 = time.perf_counter()
        try:
            done = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=cap)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = "timed out", f"{exc.stdout or ''}{exc.stderr or ''}"
            output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return {"args": args, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": output[-3000:]}

    def write(self, name: str, payload: dict) -> dict:
        (self.out / f"gpu_{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return payload


def setup(proof: Proof, bundle: Path | None) -> dict:
    """Install the bundle's wheels (no index: nothing can be fetched there) and prepare the model."""
    steps = []
    if bundle is not None and (bundle / "wheels").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(bundle / "wheels")]
        steps.append(proof.command(pip + ["-r", str(bundle / "requirements.txt")], proof.caps["setup"]))
        if steps[-1]["rc"] != 0:  # an image package outside a wheel's pins (pyarrow, fsspec): install them as they are
            steps.append(
                proof.command(pip + ["--no-deps", "-r", str(bundle / "requirements.txt")], proof.caps["setup"])
            )
    code = "import torch, transformers, sentence_transformers, peft; print(torch.__version__, torch.version.cuda)"
    steps.append(proof.command([sys.executable, "-c", code + "; import bitsandbytes"], 60))
    model, source = proof.work / "model", bundle / "model" if bundle else proof.work / "tiny-bert"
    if proof.dry_run:  # a tiny random checkpoint, saved in bfloat16 like the bundle's model
        make = f"from memory_shapes import random_checkpoint; random_checkpoint('tiny-bert', {str(proof.work)!r})"
        steps.append(proof.command([sys.executable, "-c", make], 120))
    # bfloat16 weights back to float32: full fine-tuning keeps float32 master weights
    cast = (
        "import sys; from sentence_transformers import SentenceTransformer as S; "
        "S(sys.argv[1], device='cpu', model_kwargs={'dtype': 'float32'}).float().save(sys.argv[2])"
    )
    steps.append(proof.command([sys.executable, "-c", cast, str(source), str(model)], 120))
    ok = all(s["rc"] == 0 for s in steps[-3:])  # a failed pip with a working fallback is fine
    return {"model": str(model), "steps": steps, "ok": ok}


def environment(proof: Proof, bundle: Path | None, installed: dict) -> dict:
    import platform

    import torch

    from finetune.rundir import versions

    manifest = bundle / "manifest.json" if bundle else None
    return {
        "dry_run": proof.dry_run,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "versions": versions(),
        "bundle": json.loads(manifest.read_text()) if manifest and manifest.is_file() else None,
        "setup": installed,
    }


def pytest_gpu(proof: Proof) -> dict:
    """(a) ``pytest -m gpu``: counts read from its junit report (without CUDA every test is skipped)."""
    import xml.etree.ElementTree as ET

    report = proof.work / "junit.xml"
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    ran = proof.command(args + ["tests"], proof.caps["pytest"])
    counts = None
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**ran, "counts": counts, "passed": bool(counts) and ran["rc"] in (0, 5) and not counts["failures"]}


def memory(proof: Proof) -> dict:
    """(b) Measured peak against the planner's prediction, cell by cell, and the two targets."""
    result = proof.work / "memory.json"
    grid, start, runs = DRY_MEMORY_GRID if proof.dry_run else MEMORY_GRID, time.perf_counter(), []
    for args in grid:
        left = proof.caps["memory"] - (time.perf_counter() - start)
        cmd = [sys.executable, "benchmarks/memory_gpu.py", *args, "--out", str(result), "--root", str(proof.work)]
        runs.append(proof.command(cmd, max(left, 1)))
    cells = json.loads(result.read_text())["cells"] if result.is_file() else []
    ratios = [c["measured_over_predicted"] for c in cells if c.get("measured_over_predicted")]
    big = [c for c in cells if c["shape"] == "qwen3-4b" and c.get("peak_bytes")]
    return {
        "runs": [{k: r[k] for k in ("args", "rc", "seconds")} | {"tail": r["tail"][-800:]} for r in runs],
        "cells": cells,
        "measured_cells": len(ratios),
        "worst_plan_error": max((abs(r - 1) for r in ratios), default=None),
        "plan_within_15_percent": bool(ratios) and all(abs(r - 1) <= PLAN_TOLERANCE for r in ratios),
        "qwen3_4b_peak_gib": big[0]["peak_bytes"] / 2**30 if big else None,
        "qwen3_4b_under_16_gib": bool(big) and big[0]["peak_bytes"] < QWEN3_4B_LIMIT_GIB * 2**30,
    }


def recipe_run(proof: Proof, name: str, recipe: str, overrides: list[str], model: str, cap: float) -> dict:
    """One ``python -m finetune run`` into work/runs/NAME; the first run's splits are every later run's."""
    runs, splits = proof.work / "runs", proof.work / "runs" / "nf4" / "splits.json"
    common = [f"model.name={model}", f"name={name}"]
    common += [f"splits.file={splits}"] if splits.is_file() else []
    if proof.dry_run:
        common += ["device=cpu", "data.max_queries=60", "train.max_steps=2", "train.eval_steps=1"]
    else:
        common += ["device=cuda"]
    ran = proof.command([sys.executable, "-m", "finetune", "run", recipe, *common, *overrides, "--run-dir",
                         str(runs / name)], cap)  # fmt: skip
    metrics = runs / name / "metrics.json"
    if not metrics.is_file():
        return {**ran, "finished": False}
    m = json.loads(metrics.read_text())
    keep = ("backend", "method", "train_steps", "peak_gpu_mb", "peak_rss_mb", "step_time", "precision")
    return {
        **{k: ran[k] for k in ("args", "rc", "seconds")},
        "finished": True,
        "test_ndcg@10": {"base": m["base"]["ndcg@10"], "tuned": m["tuned"]["ndcg@10"]},
        "significance": (m.get("significance") or {}).get("ndcg@10"),
        **{k: m.get(k) for k in keep},
        "run_seconds": m.get("seconds"),
    }


def faq(proof: Proof, model: str, names: list[str]) -> dict:
    """(c) The shipped recipes on the FAQ and the packaged model: nf4 LoRA, 16-bit LoRA, full."""
    start, out = time.perf_counter(), {}
    for name, (recipe, overrides) in ((n, FAQ_RUNS[n]) for n in names):
        left = proof.caps["faq"] - (time.perf_counter() - start)
        out[name] = recipe_run(proof, name, recipe, overrides, model, max(left, 1))
    return {"runs": out}


def unsloth(proof: Proof, model: str, unsloth_bundle: Path | None) -> dict:
    """(d) backend=unsloth against peft on the same recipe and splits, or why it could not run."""
    steps = []
    if unsloth_bundle is not None and unsloth_bundle.is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        steps.append(proof.command(pip + ["--find-links", str(unsloth_bundle), "unsloth", "unsloth_zoo"], 60))
    probe = proof.command([sys.executable, "-c", "import unsloth"], 60)
    if probe["rc"] != 0:
        last = probe["tail"].strip().splitlines()[-1:] or ["no output"]
        why = "not installed: its wheels (about 30 MiB) do not fit beside the bundle in one 64 MiB call; "
        why += "carry .gpu_proof-unsloth (gpu_wheels.py --unsloth) as --unsloth-bundle in a second call"
        return {"ran": False, "why": why if unsloth_bundle is None else f"import unsloth failed: {last[0]}"}
    peft_dir, mine = proof.work / "runs" / "nf4", proof.work / "runs" / "unsloth"
    run = recipe_run(proof, "unsloth", "recipes/qlora.yaml", ["backend=unsloth"], model, proof.caps["unsloth"])
    if not run["finished"] or not (peft_dir / "per_query.jsonl").is_file():
        return {"ran": False, "why": "a run did not finish", "install": steps, "run": run}
    from finetune.report import read_per_query
    from finetune.significance import paired_metric

    tuned = [read_per_query(d / "per_query.jsonl")["tuned"] for d in (peft_dir, mine)]
    paired = paired_metric(*tuned, "ndcg@10")
    peft_step = json.loads((peft_dir / "metrics.json").read_text())["seconds"]["per_step"]
    unsloth_step = (run.get("run_seconds") or {}).get("per_step")
    return {
        "ran": True,
        "run": run,
        "unsloth_minus_peft_test_ndcg@10": paired,
        "same_within_paired_interval": paired["ci_low"] <= 0 <= paired["ci_high"],
        "step_time_ratio_unsloth_over_peft": unsloth_step / peft_step if unsloth_step and peft_step else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the gpu_*.json results")
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_proof", help="from benchmarks/gpu_wheels.py")
    parser.add_argument("--unsloth-bundle", type=Path, default=None, help="from gpu_wheels.py --unsloth")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and model: checks the script only")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)}")
    parser.add_argument("--faq-runs", default=",".join(FAQ_RUNS), help=f"a subset of {','.join(FAQ_RUNS)}")
    args = parser.parse_args(argv)
    stages, faq_runs = args.stages.split(","), args.faq_runs.split(",")
    if not set(stages) <= set(STAGES) or not set(faq_runs) <= set(FAQ_RUNS) or "nf4" not in faq_runs:
        parser.error(f"--stages takes {','.join(STAGES)}; --faq-runs takes {','.join(FAQ_RUNS)} and needs nf4")
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle if args.bundle.is_dir() else None
    if bundle is None and not args.dry_run:
        raise SystemExit(f"no bundle at {args.bundle}: run benchmarks/gpu_wheels.py and carry it")
    proof = Proof(args.out, Path(tempfile.mkdtemp(prefix="gpu-proof-")), args.dry_run)
    installed = setup(proof, None if args.dry_run else bundle)
    proof.write("env", environment(proof, bundle, installed))
    summary = {}
    if "pytest" in stages:
        summary["pytest"] = proof.write("pytest", pytest_gpu(proof))["passed"]
    if "memory" in stages:
        mem = proof.write("memory", memory(proof))
        summary.update({k: mem[k] for k in ("plan_within_15_percent", "qwen3_4b_under_16_gib", "worst_plan_error")})
    if "faq" in stages:
        runs = proof.write("faq", faq(proof, installed["model"], faq_runs))["runs"]
        summary["faq_test_ndcg@10"] = {k: r.get("test_ndcg@10") for k, r in runs.items()}
    if "unsloth" in stages:
        summary["unsloth"] = proof.write("unsloth", unsloth(proof, installed["model"], args.unsloth_bundle))
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
