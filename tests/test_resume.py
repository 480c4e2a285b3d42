"""Kill a run with SIGKILL mid-training, resume it, and get the metrics of an uninterrupted run."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import adapter_recipe, make_pairs

from finetune.cli import main

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


def _write(tmp_path: Path, raw: dict, n_pairs: int) -> str:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n_pairs)))
    raw["data"] = {"path": str(pairs), "columns": COLUMNS}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert ready(), "no checkpoint appeared in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _epoch(state: Path) -> int:
    try:
        return torch.load(state, weights_only=True)["epoch"] if state.is_file() else 0
    except Exception:  # caught between write and rename is impossible; mid-read of an old file is not
        return 0


def test_adapter_run_killed_mid_training_resumes_to_the_same_metrics(tmp_path, tiny_model):
    raw = adapter_recipe(
        None,
        tiny_model,
        tmp_path,
        train={"epochs": 40, "batch_size": 2, "patience": None, "lr": 1e-3},
        adapter={"type": "mlp", "hidden_dim": 32, "dropout": 0.3},  # dropout: the global RNG must be restored
    )
    recipe = _write(tmp_path, raw, 300)
    killed = tmp_path / "killed"
    _kill_when(["run", recipe, "--run-dir", str(killed)], lambda: _epoch(killed / "checkpoint" / "state.pt") >= 3)
    seen = _epoch(killed / "checkpoint" / "state.pt")
    assert not (killed / "metrics.json").exists() and seen < 40

    assert main(["run", recipe, "--resume", str(killed)]) == 0
    assert main(["run", recipe, "--run-dir", str(tmp_path / "straight")]) == 0
    resumed, straight = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("killed", "straight"))
    assert resumed["resumed_from_epoch"] >= seen  # at most one save interval (one epoch) lost
    assert resumed["history"] == straight["history"]
    assert resumed["tuned"] == pytest.approx(straight["tuned"], abs=1e-6)


def test_qlora_run_killed_mid_training_resumes_to_the_same_metrics(tmp_path, tiny_model):
    raw = {
        "kind": "qlora",
        "name": "q",
        "quantization": "none",
        "model": {"name": str(tiny_model), "batch_size": 16},
        "train": {
            "epochs": 100,
            "max_steps": 150,
            "batch_size": 4,
            "lr": 2e-3,
            "eval_steps": 10,
            "logging_steps": 10,
            "warmup_ratio": 0.1,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    recipe = _write(tmp_path, raw, 100)
    runs = tmp_path / "runs"

    def done():
        return any(
            (p / "trainer_state.json").is_file()
            for p in runs.glob("q-*/checkpoints/checkpoint-*")
            if int(p.name.split("-")[1]) >= 30
        )

    _kill_when(["run", recipe], done)
    (killed,) = runs.glob("q-*")
    assert not (killed / "metrics.json").exists()

    assert main(["run", recipe, "--resume"]) == 0  # the newest unfinished run of this recipe: the killed one
    assert main(["run", recipe, "--run-dir", str(tmp_path / "straight")]) == 0
    resumed, straight = (json.loads((d / "metrics.json").read_text()) for d in (killed, tmp_path / "straight"))
    assert resumed["resumed_from_step"] >= 30 and resumed["train_steps"] == straight["train_steps"] == 150
    ran = resumed["train_steps"] - resumed["resumed_from_step"]  # the seconds are this process's only
    assert resumed["seconds"]["per_step"] == pytest.approx(resumed["seconds"]["train"] / ran)
    assert resumed["tuned"]["ndcg@10"] == pytest.approx(straight["tuned"]["ndcg@10"], abs=2e-3)
    # the loss logged over the last steps (train_loss itself only averages the steps since the resume)
    last = [[h["loss"] for h in m["log_history"] if "loss" in h and h["step"] > 100] for m in (resumed, straight)]
    assert last[0] and last[0] == pytest.approx(last[1], rel=0.02)


def test_resume_refuses_a_different_recipe_and_a_finished_run(tmp_path, tiny_model, capsys):
    raw = adapter_recipe(None, tiny_model, tmp_path, train={"epochs": 2, "batch_size": 8, "patience": None})
    recipe = _write(tmp_path, raw, 40)
    run_dir = tmp_path / "r"
    (run_dir).mkdir()
    (run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(dict(yaml.safe_load(Path(recipe).read_text()), kind="adapter"))
    )
    assert main(["run", recipe, "--resume", str(run_dir), "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "the recipe differs from the run's at" in err and err.count("\n") == 1
    assert main(["run", recipe, "--run-dir", str(tmp_path / "done")]) == 0
    assert main(["run", recipe, "--resume", str(tmp_path / "done")]) == 2
    assert "this run has finished; nothing to resume" in capsys.readouterr().err


class _Killed(Exception):
    pass


def test_adapter_resume_with_dropout_equals_the_uninterrupted_run(tmp_path):
    """Dropout draws from torch's global RNG: a resumed run must restore it to retrace the same updates.

    The "kill" is a validation call that raises after epoch 3 (its checkpoint is written by then);
    the resumed loop starts in a process whose global RNG has moved on, as a new process's would.
    """
    from finetune.adapter.checkpoint import load_training_state
    from finetune.adapter.config import AdapterTrainConfig, LossConfig
    from finetune.adapter.modules import build_adapter
    from finetune.adapter.negatives import NegativeSampler, relevance_keys
    from finetune.adapter.train import train_adapter

    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    docs = torch.nn.functional.normalize(queries + 0.3 * torch.randn(40, 16, generator=gen), dim=-1)
    pairs = torch.stack([torch.arange(40), torch.arange(40)], dim=1)
    config = AdapterTrainConfig(epochs=6, batch_size=8, lr=1e-2, patience=None, warmup_ratio=0.0)
    scores = itertools.count()

    def run(checkpoint, kill_after=None, resume_from=None):
        torch.manual_seed(1234 if resume_from is None else 999)  # a resumed process's RNG is elsewhere
        adapter = build_adapter("mlp", 16, hidden_dim=32, dropout=0.5)
        calls = []

        def validate(a):
            calls.append(1)
            if kill_after is not None and len(calls) > kill_after + 1:  # call 1 scores epoch 0
                raise _Killed
            return float(next(scores))  # always improving, across runs too: the last epoch is kept

        sampler = NegativeSampler(docs, relevance_keys(pairs, len(docs)), per_query=0)
        history = train_adapter(
            adapter, queries, docs, pairs, sampler, LossConfig(), config, 0, validate, checkpoint, resume_from
        )
        return adapter.state_dict(), history

    straight, _ = run(tmp_path / "straight.pt")
    killed = tmp_path / "killed.pt"
    with pytest.raises(_Killed):
        run(killed, kill_after=3)
    state = load_training_state(killed)
    assert state["epoch"] == 3
    resumed, history = run(killed, resume_from=state)
    assert [h["epoch"] for h in history] == list(range(7))
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_a_half_written_qlora_checkpoint_is_skipped(tmp_path):
    """A checkpoint folder without ``trainer_state.json`` (killed while saving) is never resumed from."""
    from finetune.qlora.trainer import latest_checkpoint

    for step, complete in ((9, True), (20, True), (100, True), (110, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"  # by step number, not by name
    (tmp_path / "checkpoint-100" / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    for step in (9, 20):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_of_another_adapter_shape_is_refused_in_one_line(tmp_path):
    from finetune.adapter.checkpoint import restore
    from finetune.adapter.modules import build_adapter
    from finetune.errors import FinetuneError

    saved, live = build_adapter("linear", 8), build_adapter("linear", 16)
    optimizer = torch.optim.AdamW(live.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"adapter": saved.state_dict()}
    with pytest.raises(FinetuneError, match=r"adapter weights do not fit this recipe's adapter \(delta.bias: \(8,\)"):
        restore(state, live, optimizer, schedule, torch.Generator(), where=tmp_path / "state.pt")


class _Payload:  # not a tensor, number or string: only a full unpickler builds it
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_holding_arbitrary_objects_is_refused_unread(tmp_path):
    """``weights_only`` loading: a checkpoint that would run code when unpickled is refused in one line."""
    from finetune.adapter.checkpoint import load_training_state
    from finetune.errors import FinetuneError

    path = tmp_path / "training_state.pt"
    torch.save({"epoch": 1, "payload": _Payload()}, path)
    with pytest.raises(FinetuneError, match="cannot read the checkpoint .*delete it to restart"):
        load_training_state(path)
