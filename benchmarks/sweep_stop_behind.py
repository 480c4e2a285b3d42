"""What stopping behind points would have saved in QLoRA sweeps that trained every point to the end.

A point's validation curve up to the step where it stops is the same whether or not it stops
(same seed, same batches), so a sweep that ran with ``--stop-behind 0`` (or before the rule
existed) can be replayed: for each point in order (grid order, then reversed), the leader is the
best point finished before it, and :class:`finetune.qlora.behind.StopBehind` reads the point's
recorded evaluations. The replay gives the step where each point would have stopped, the optimizer
steps and (prorated) seconds saved, and whether the choice stays the same.

    python benchmarks/sweep_stop_behind.py runs/sweep-qlora-faq runs/sweep-qlora-disfl --name sweep_stop_behind
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from record import write_result

from finetune.qlora.behind import Leader, StopBehind, val_ndcg_key, validation_curve
from finetune.sweep import STOP_BEHIND


def replay_point(log_history: list[dict], leader: Leader | None) -> dict | None:
    """Where the rule stops a point with this evaluation history (None: it trains to the end)."""
    if leader is None:
        return None
    stop, control = StopBehind(leader, "ndcg"), SimpleNamespace(should_training_stop=False)
    for entry in log_history:
        key = val_ndcg_key(entry)
        if key is None:
            continue
        state = SimpleNamespace(epoch=float(entry["epoch"]), global_step=int(entry["step"]))
        stop.on_evaluate(None, state, control, metrics={"ndcg": entry[key]})
        if control.should_training_stop:
            return stop.stopped
    return None


def replay(sweep: Path, margin: float, reverse: bool = False) -> dict:
    """Replay the stopping rule over one finished sweep directory (its points in reverse order with ``reverse``)."""
    summary = json.loads((sweep / "sweep.json").read_text())
    finished, points = [], []
    for row in summary["points"][::-1] if reverse else summary["points"]:
        metrics = json.loads((sweep / row["run"] / "metrics.json").read_text())
        leader = None
        if finished:
            best = max(finished, key=lambda r: r["val_ndcg@10"])
            leader = Leader(validation_curve(best["log_history"]), margin)
        stopped = replay_point(metrics["log_history"], leader)
        steps = metrics["train_steps"]
        kept = stopped["step"] if stopped else steps
        point = {
            "settings": row["settings"],
            "val_ndcg@10": stopped["best"] if stopped else row["val_ndcg@10"],
            "steps": steps,
            "steps_with_stopping": kept,
            "seconds": row["seconds"],
            "seconds_with_stopping": row["seconds"] * kept / steps,
            "stopped": stopped,
        }
        points.append(point)
        finished.append({**point, "log_history": metrics["log_history"]})
    chosen = max(points, key=lambda p: p["val_ndcg@10"])["settings"]
    return {
        "sweep": str(sweep),
        "order": "reverse grid order" if reverse else "grid order",
        "command": "python -m finetune sweep " + " ".join([summary["recipe"], *summary["arguments"]]),
        "points": points,
        "steps": sum(p["steps"] for p in points),
        "steps_with_stopping": sum(p["steps_with_stopping"] for p in points),
        "seconds": sum(p["seconds"] for p in points),
        "seconds_with_stopping": sum(p["seconds_with_stopping"] for p in points),
        "chosen": summary["chosen"]["settings"],
        "chosen_with_stopping": chosen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="finished QLoRA sweep directories whose points trained to the end")
    parser.add_argument("--margin", type=float, default=STOP_BEHIND)
    parser.add_argument("--name", default="sweep_stop_behind")
    args = parser.parse_args()

    # the leader is the best point run so far, so what is saved depends on the order: both are shown
    results = [replay(Path(s), args.margin, reverse) for s in args.sweeps for reverse in (False, True)]
    for r in results:
        print(f"\n{r['command']} ({r['order']})")
        for p in r["points"]:
            where = f"stops at step {p['stopped']['step']} of {p['steps']}" if p["stopped"] else "trains to the end"
            label = " ".join(f"{k}={v}" for k, v in p["settings"].items())
            print(f"  {label}: val NDCG@10 {p['val_ndcg@10']:.4f}, {where}")
        same = "the same choice" if r["chosen"] == r["chosen_with_stopping"] else "a DIFFERENT choice"
        print(
            f"  steps {r['steps_with_stopping']}/{r['steps']} (x{r['steps_with_stopping'] / r['steps']:.2f}), "
            f"seconds ~{r['seconds_with_stopping']:.0f}/{r['seconds']:.0f}; {same}"
        )
    write_result(args.name, {"margin": args.margin, "patience": Leader([], 0).patience, "sweeps": results})


if __name__ == "__main__":
    main()
