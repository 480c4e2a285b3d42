"""``finetune sweep``: a grid of normal runs on one splits file, chosen on validation, test scored once."""

import json

import pytest
import yaml
from conftest import COLUMNS_PAIRS, adapter_recipe, qlora_recipe

from finetune import evaluation
from finetune.cli import main
from finetune.compare import gather_runs
from finetune.errors import FinetuneError
from finetune.sweep import parse_grid, run_sweep


@pytest.fixture
def recipe_file(pairs_file, tiny_model, tmp_path):
    def write(kind="adapter", **sections):
        data = {"path": str(pairs_file), "columns": COLUMNS_PAIRS}
        build = adapter_recipe if kind == "adapter" else qlora_recipe
        raw = build(data, tiny_model, tmp_path, **sections)
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


@pytest.fixture
def scored(monkeypatch):
    """``(query ids, run directory)`` of every evaluator call, in order."""
    import finetune.run

    calls, current = [], [None]
    evaluate, run_recipe = evaluation.PerQueryEvaluator.__call__, finetune.run.run_recipe

    def spy_evaluate(self, *args, **kwargs):
        calls.append((frozenset(self.queries_ids), current[0]))
        return evaluate(self, *args, **kwargs)

    def spy_run(*args, **kwargs):
        current[0] = kwargs.get("run_dir")
        return run_recipe(*args, **kwargs)

    monkeypatch.setattr(evaluation.PerQueryEvaluator, "__call__", spy_evaluate)
    monkeypatch.setattr(finetune.run, "run_recipe", spy_run)
    return calls


def _test_split_runs(calls, out) -> set:
    """The run directories in which the sweep's test split was scored."""
    test = frozenset(json.loads((out / "splits.json").read_text())["test"])
    return {run for ids, run in calls if ids == test}


def test_sweep_chooses_on_validation_and_scores_the_test_split_once(recipe_file, tmp_path, scored):
    out = run_sweep(
        recipe_file(),
        ["train.lr=1e-3,1e-2", "adapter.type=linear,mlp", "train.epochs=2"],
        directory=str(tmp_path / "sw"),
    )
    summary = json.loads((out / "sweep.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    # the test split is scored in the final run only, never in a point's
    assert _test_split_runs(scored, out) == {str(out / "final")}
    assert sum(ids == frozenset(splits["val"]) for ids, _ in scored) > 2 * len(summary["points"])
    rows = summary["points"]
    assert len(rows) == 4 and [r["settings"] for r in rows][0] == {"train.lr": "1e-3", "adapter.type": "linear"}
    best = max(rows, key=lambda r: r["val_ndcg@10"])
    assert summary["chosen"]["settings"] == best["settings"]
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert summary["test_ndcg@10"] == {"base": final["base"]["ndcg@10"], "tuned": final["tuned"]["ndcg@10"]}
    resolved = yaml.safe_load((out / "final" / "recipe.yaml").read_text())
    assert str(resolved["train"]["lr"]) == str(float(best["settings"]["train.lr"]))
    assert resolved["adapter"]["type"] == best["settings"]["adapter.type"] and resolved["train"]["epochs"] == 2
    for r in rows:  # points: the sweep's splits, validation scored, nothing exported
        point = out / r["run"]
        metrics = json.loads((point / "metrics.json").read_text())
        assert metrics["scored_split"] == "val" and not (point / "model").exists()
        assert json.loads((point / "splits.json").read_text())["test"] == splits["val"]
        assert metrics["tuned"]["ndcg@10"] == r["val_ndcg@10"]
    assert (out / "final" / "model").is_dir() and final["scored_split"] == "test"
    assert (out / "sweep.png").stat().st_size > 0 and "**chosen**" in (out / "sweep.md").read_text()


def test_a_point_scores_what_a_plain_run_keeps_on_validation(recipe_file, tmp_path):
    from finetune.recipe import load_recipe
    from finetune.run import run_recipe

    path = recipe_file(train={"epochs": 4, "batch_size": 8, "patience": None, "lr": 1e-3})
    out = run_sweep(path, ["train.lr=1e-3,3e-3"], directory=str(tmp_path / "sw"))
    point = json.loads((out / "sweep.json").read_text())["points"][0]
    plain = run_recipe(load_recipe(path, [f"splits.file={out / 'splits.json'}"]), echo=lambda *_: None)
    history = json.loads((plain / "metrics.json").read_text())["history"]
    assert point["val_ndcg@10"] == pytest.approx(max(h["val_ndcg@10"] for h in history), abs=1e-9)


def test_budget_samples_points_with_the_seed_and_a_sweep_resumes(recipe_file, tmp_path, monkeypatch):
    import finetune.run

    grid = ["train.lr=1e-4,1e-3,1e-2", "loss.temperature=0.05,0.1"]
    out = run_sweep(recipe_file(), grid, budget=3, directory=str(tmp_path / "sw"))
    first = json.loads((out / "sweep.json").read_text())
    assert len(first["points"]) == 3
    again = run_sweep(recipe_file(), grid, budget=3, directory=str(tmp_path / "sw2"))
    assert [p["settings"] for p in json.loads((again / "sweep.json").read_text())["points"]] == [
        p["settings"] for p in first["points"]
    ]
    (out / "sweep.json").unlink()
    (out / "points" / "002" / "metrics.json").unlink()  # as if stopped during the last point
    ran = []
    original = finetune.run.run_recipe
    monkeypatch.setattr(finetune.run, "run_recipe", lambda *a, **k: ran.append(k["run_dir"]) or original(*a, **k))
    resumed = json.loads((run_sweep(recipe_file(), grid, budget=3, directory=str(out)) / "sweep.json").read_text())
    assert ran == [str(out / "points" / "002")]  # finished points and the final run are read back
    assert [p["val_ndcg@10"] for p in resumed["points"]] == [p["val_ndcg@10"] for p in first["points"]]
    with pytest.raises(FinetuneError, match="holds a different sweep"):
        run_sweep(recipe_file(), ["train.lr=1e-4,1e-3"], directory=str(out))


def test_compare_reads_a_sweep_directory_as_its_final_run(recipe_file, tmp_path):
    out = run_sweep(recipe_file(), ["train.lr=1e-3,1e-2"], directory=str(tmp_path / "sw"))
    assert gather_runs([str(out)], echo=lambda *_: None) == [out / "final"]


def test_a_qlora_sweep_trains_points_without_exporting(recipe_file, tmp_path, scored):
    out = run_sweep(recipe_file("qlora", steps=4), ["train.lr=1e-3,5e-3"], directory=str(tmp_path / "sw"))
    summary = json.loads((out / "sweep.json").read_text())
    for r in summary["points"]:
        assert not (out / r["run"] / "model").exists() and not (out / r["run"] / "lora").exists()
    assert (out / "final" / "model").is_dir() and (out / "final" / "lora").is_dir()
    assert _test_split_runs(scored, out) == {str(out / "final")}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_qlora_final_run_reuses_the_chosen_points_training_and_equals_a_plain_run(recipe_file, tmp_path, method):
    from finetune.recipe import load_recipe
    from finetune.run import run_recipe

    path = recipe_file("qlora", steps=8, method=method, quantization="nf4" if method == "lora" else "none")
    out = run_sweep(path, ["train.lr=1e-3,5e-3"], directory=str(tmp_path / "sw"))
    summary = json.loads((out / "sweep.json").read_text())
    chosen = out / summary["points"][summary["chosen"]["point"]]["run"]
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["training_reused_from"] == str(chosen) and final["step_time"]["steps_timed"] == 0
    assert final["train_steps"] == 8 and final["resumed_from_step"] == 8 and final["seconds"]["per_step"] is None
    overrides = [f"splits.file={out / 'splits.json'}", f"train.lr={summary['chosen']['settings']['train.lr']}"]
    plain = json.loads((run_recipe(load_recipe(path, overrides), echo=lambda *_: None) / "metrics.json").read_text())
    assert final["tuned_as_trained"]["ndcg@10"] == pytest.approx(plain["tuned_as_trained"]["ndcg@10"], abs=1e-6)
    assert final["tuned"]["ndcg@10"] == pytest.approx(plain["tuned"]["ndcg@10"], abs=1e-6)
    assert final["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)
    assert (chosen / "checkpoints").is_dir() and (out / "final" / "checkpoints").is_dir()
    state = json.loads(next((out / "final" / "checkpoints").glob("checkpoint-8/trainer_state.json")).read_text())
    assert state["best_model_checkpoint"].startswith(str(out / "final" / "checkpoints"))

    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(chosen / "checkpoints")  # cleaned up before a resume: the final run trains again, to the same
    resumed = run_sweep(path, ["train.lr=1e-3,5e-3"], directory=str(out))
    again = json.loads((resumed / "final" / "metrics.json").read_text())
    assert again["training_reused_from"] is None and again["step_time"]["steps_timed"] == 8
    assert again["tuned"]["ndcg@10"] == pytest.approx(final["tuned"]["ndcg@10"], abs=1e-6)


def test_a_qlora_point_behind_the_leader_stops_and_cannot_be_chosen(recipe_file, tmp_path, monkeypatch):
    import finetune.sweep
    from finetune.qlora.behind import Leader, validation_curve

    leaders, real = [], finetune.sweep.leader_of

    def unbeatable_after_the_first(out, rows, margin):
        leader = real(out, rows, margin)
        leaders.append(leader)
        return Leader([(0.0, 2.0)], margin) if rows else leader  # no NDCG@10 reaches 2: every point is behind

    monkeypatch.setattr(finetune.sweep, "leader_of", unbeatable_after_the_first)
    path = recipe_file("qlora", steps=12)  # evaluates every 4 steps
    out = run_sweep(path, ["train.lr=5e-3,1e-3"], directory=str(tmp_path / "sw"))
    summary = json.loads((out / "sweep.json").read_text())
    first, second = (json.loads((out / r["run"] / "metrics.json").read_text()) for r in summary["points"])
    # the first point had nothing to follow; the real leader of the second is the first's own curve
    assert leaders[0] is None and leaders[1].curve == validation_curve(first["log_history"])
    assert leaders[1].margin == 0.02 and summary["stop_behind"] == 0.02
    assert first["train_steps"] == 12 and first["stopped_behind"] is None
    assert second["train_steps"] == 8  # behind at its evaluations at steps 4 and 8: patience 2
    assert summary["points"][1]["stopped_behind"]["step"] == 8 and summary["chosen"]["point"] == 0
    assert "(stopped at epoch" in (out / "sweep.md").read_text()


def test_a_qlora_point_cut_off_mid_training_continues_from_its_checkpoint(recipe_file, tmp_path):
    import shutil

    path, grid = recipe_file("qlora", steps=8), ["train.lr=1e-3,5e-3"]  # saves every 4 steps
    out = run_sweep(path, grid, directory=str(tmp_path / "sw"), stop_behind=0)
    point = out / "points" / "001"
    whole = json.loads((point / "metrics.json").read_text())
    for name in ("metrics.json", "per_query.jsonl"):  # what a kill at step 6 leaves: checkpoint-4 only
        (point / name).unlink(missing_ok=True)
    shutil.rmtree(point / "checkpoints" / "checkpoint-8")
    shutil.rmtree(out / "final")
    lines = []
    run_sweep(path, grid, directory=str(out), echo=lines.append, stop_behind=0)
    again = json.loads((point / "metrics.json").read_text())
    assert any("point 1 was cut off; continuing from checkpoint-4" in line for line in lines)
    assert again["resumed_from_step"] == 4 and again["train_steps"] == 8
    assert again["tuned"]["ndcg@10"] == pytest.approx(whole["tuned"]["ndcg@10"], abs=1e-6)  # as if never cut off
    # its seconds cover the resumed call only, and the table says so
    assert json.loads((out / "sweep.json").read_text())["points"][1]["resumed_from_step"] == 4
    assert "(resumed from step 4: seconds since then)" in (out / "sweep.md").read_text()


def test_behind_means_below_the_leaders_best_by_the_same_epoch_twice_in_a_row():
    from types import SimpleNamespace

    from finetune.qlora.behind import Leader, StopBehind

    leader = Leader([(1.0, 0.70), (2.0, 0.80), (3.0, 0.78)], margin=0.02)
    stop = StopBehind(leader, "eval_val_cosine_ndcg@10")
    control = SimpleNamespace(should_training_stop=False)

    def evaluate(epoch, value):
        state = SimpleNamespace(epoch=epoch, global_step=int(epoch * 10))
        stop.on_evaluate(None, state, control, metrics={"eval_val_cosine_ndcg@10": value})
        return control.should_training_stop

    assert not evaluate(0.5, 0.10)  # the leader had not evaluated by epoch 0.5
    assert not evaluate(1.0, 0.60)  # behind once (0.60 < 0.70 - 0.02)
    assert not evaluate(2.0, 0.785)  # its best by epoch 2 is within the margin of 0.80: the count restarts
    assert not evaluate(3.0, 0.70)  # its best so far, 0.785, is within 0.02 of the leader's 0.80
    assert stop.behind == 0
    stop.best = 0.5
    assert not evaluate(3.5, 0.5) and evaluate(4.0, 0.5)
    assert stop.stopped == {"epoch": 4.0, "step": 40, "best": 0.5, "leader_best": 0.80}


@pytest.mark.parametrize(
    "grid, message",
    [
        (["train.lrr=1e-3,1e-2"], r"train.lrr: unknown field \(did you mean 'lr'\?\)"),
        (["train.lr=fast,1e-2"], r"train.lr: .*\(at the point train.lr=fast\)"),
        (["train.lr="], "'train.lr=' lists no value"),
        (["train.lr=1e-3"], "no key lists two or more values"),
        (["eval.also=[a],[b]"], "eval.also is not swept"),
        (["train.lr=1e-3,1e-2", "splits.val_fraction=0"], "set splits.val_fraction above 0"),
        (["train.lr=1e-3,1e-2", "--stop-behind", "0.05"], "--stop-behind is for qlora sweeps"),
        (["train.lr=1e-3,1e-2", "--stop-behind=-1"], "an NDCG@10 margin, 0 or more"),
    ],
)
def test_bad_sweeps_fail_with_one_line_and_write_nothing(recipe_file, tmp_path, capsys, grid, message):
    assert main(["sweep", recipe_file(), *grid, "--dir", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and __import__("re").search(message, err[0])
    assert not (tmp_path / "sw").exists() and not (tmp_path / "runs").exists()


def test_cross_adapter_recipes_are_not_swept(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / "cross_adapter.yaml"
    with pytest.raises(FinetuneError, match="cross_adapter run already chooses"):
        run_sweep(str(recipe), ["train.lr=1e-3,1e-2"], directory=str(tmp_path / "sw"))


def test_grid_values_split_at_top_level_commas_only():
    fixed, grid = parse_grid(["train.lr=1e-3,3e-3", "eval.also=[a,b]", "negatives.strategy=none,'x,y'"])
    assert fixed == ["eval.also=[a,b]"] and grid == {
        "train.lr": ["1e-3", "3e-3"],
        "negatives.strategy": ["none", "'x,y'"],
    }


def test_a_setting_without_effect_at_a_point_goes_to_its_default_and_moot_points_run_once(recipe_file):
    from finetune.sweep import plan_points

    path = recipe_file(negatives={"strategy": "random", "per_query": 3})
    _, points, notes = plan_points(path, ["negatives.strategy=none,random", "train.lr=1e-3,3e-3"])
    assert [p.recipe.negatives.per_query for p in points] == [1, 1, 3, 3]
    assert notes == [
        "negatives.per_query=3 has no effect unless negatives.strategy is not none; "
        "at the points where it has none, it stays at its default"
    ]
    _, points, _ = plan_points(path, ["negatives.strategy=none,mined", "negatives.per_query=2,4"])
    assert [p.settings["negatives.per_query"] for p in points] == ["-", "2", "4"]  # none x (2, 4) is one point
