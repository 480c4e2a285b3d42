"""Peak RSS of the QLoRA default on a CPU, and what the plan predicted, side by side in one run.

Runs of ``recipes/qlora.yaml`` on a data set (Disfl-QA: paragraphs up to 256 tokens; without
``--data`` the recipe's own FAQ), each in its own process and bounded by ``train.max_steps``: glibc's
default allocator or the toolkit's fixed mmap threshold (:mod:`finetune.memory.host`;
``FINETUNE_GLIBC_MALLOC=default`` turns it off), with gradient checkpointing off, on, or ``auto``
(the shipped default: the plan decides). Each row holds the process's peak RSS, the peak when
training ended, the plan's predicted peak RSS, whether it checkpointed, the median step time and
the per-step training loss (equal losses: the allocator and checkpointing change where memory comes
from, not what is computed).

    python benchmarks/qlora_rss.py --data $DISFL_QA --steps 2
    python benchmarks/qlora_rss.py --data $DISFL_QA --steps 2 --variants "glibc default, checkpointing off" \
        "fixed threshold, checkpointing off" "fixed threshold, checkpointing on"
    python benchmarks/qlora_rss.py --data $DISFL_QA --steps 6 --variants "fixed threshold, checkpointing off" \
        "fixed threshold, checkpointing on" "fixed threshold, checkpointing auto" --out .../qlora_rss_time_disfl.json

The first variant named is the one the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (environment, overrides)
    "glibc default, checkpointing off": ({"FINETUNE_GLIBC_MALLOC": "default"}, ["train.gradient_checkpointing=false"]),
    "fixed threshold, checkpointing off": ({}, ["train.gradient_checkpointing=false"]),
    "glibc default, checkpointing on": ({"FINETUNE_GLIBC_MALLOC": "default"}, ["train.gradient_checkpointing=true"]),
    "fixed threshold, checkpointing on": ({}, ["train.gradient_checkpointing=true"]),
    "fixed threshold, checkpointing auto": ({}, []),  # the shipped default: the plan decides
}


def run(name: str, data: str | None, steps: int, work: Path) -> dict:
    env, overrides = VARIANTS[name]
    run_dir = work / name.replace(", ", "-").replace(" ", "_")
    command = [sys.executable, "-m", "finetune", "run", str(ROOT / "recipes" / "qlora.yaml")]
    command += [f"data={data}"] if data else []
    command += [f"train.max_steps={steps}", "train.logging_steps=1", *overrides, "--run-dir", str(run_dir)]
    command += ["--overwrite"]
    said = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(command[1:])
    done = run_dir / "metrics.json"
    if done.is_file() and " ".join(command[3:]) in (run_dir / "command.txt").read_text().split("\n")[0]:
        print(f"kept: {run_dir} (finished with the same command)", flush=True)
    else:
        print("$", said, flush=True)
        with (work / f"{run_dir.name}.log").open("w") as log:
            rc = subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc.returncode:
            raise SystemExit(f"{name} failed (exit {rc.returncode}); see {log.name}")
    m = json.loads((run_dir / "metrics.json").read_text())
    plan = m.get("memory_plan") or {}
    return {
        "command": said,
        "peak_rss_mb": m["peak_rss_mb"],
        "peak_rss_mb_after_training": m["stages"]["training"]["peak_rss_mb"],
        "predicted_rss_mb": plan.get("predicted_rss_mb"),
        "predicted_rss": plan.get("predicted_rss"),
        "gradient_checkpointing": m.get("gradient_checkpointing"),
        "median_step_s": m["step_time"]["median_s"],
        "losses": [h["loss"] for h in m["log_history"] if "loss" in h],
        "tuned_ndcg@10": m["tuned"]["ndcg@10"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a BEIR folder, e.g. Disfl-QA (default: the recipe's own, the FAQ)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--work", default="runs/qlora-rss", help="run folders (a finished one is kept)")
    parser.add_argument("--out", default=str(RESULTS / "qlora_rss_disfl.json"))
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = {name: run(name, args.data, args.steps, work) for name in args.variants}
    base = rows[args.variants[0]]
    summary = {
        name: {
            "peak_rss_gib": r["peak_rss_mb"] / 1024,
            "predicted_rss_gib": (r["predicted_rss_mb"] or 0) / 1024,
            f"rss_vs_{args.variants[0]}": r["peak_rss_mb"] / base["peak_rss_mb"],
            f"step_time_vs_{args.variants[0]}": r["median_step_s"] / base["median_step_s"],
            f"same_losses_as_{args.variants[0]}": r["losses"] == base["losses"],
        }
        for name, r in rows.items()
    }
    write_result(Path(args.out).stem, {"runs": rows, "summary": summary}, Path(args.out))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
