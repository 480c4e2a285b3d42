"""Data-parallel QLoRA through torchrun: 2 CPU processes over gloo agree, and only rank 0 writes."""

import json
import os
import re
import socket
import subprocess
import sys

import yaml
from conftest import make_pairs, qlora_recipe

COLUMNS = {"query": "question", "positive": "answer", "id": "id"}


def test_two_gloo_processes_train_in_step_and_only_rank_0_writes(tmp_path, tiny_model):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(80)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            qlora_recipe(
                {"path": str(pairs), "columns": COLUMNS},
                tiny_model,
                tmp_path,
                steps=6,
                name="dist",
                quantization="nf4",
            )
        )
    )
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "finetune",
        "run",
        str(recipe),
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = dict(
        re.findall(r"rank (\d)/2: (steps \d+, as-trained test ndcg@10 [\d.]+, lora sha256 \w+)", result.stderr)
    )
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"]  # same steps, same scores, identical weights
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run directory, written by rank 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 6
    assert (run_dir / "lora" / "adapter_model.safetensors").is_file() and (run_dir / "model").is_dir()
    assert result.stdout.count("run directory:") == 1 and result.stdout.count("metric ") == 1
