"""Is the gain real: per-query scores from the evaluator's own ranking, paired intervals and p-values."""

import json

import numpy as np
import pytest
import yaml
from conftest import COLUMNS_PAIRS, adapter_recipe
from sentence_transformers import SentenceTransformer

from finetune.cli import main
from finetune.data import load_data
from finetune.errors import FinetuneError
from finetune.evaluation import build_evaluator, evaluate
from finetune.significance import PER_QUERY, compare_rows, mean_interval, paired_difference


def test_per_query_means_equal_the_evaluators_figures(tiny_model, pairs_file):
    data = load_data(validate_data(pairs_file))
    ids = sorted(data.queries)[:30]
    scores = evaluate(build_evaluator(data, ids, "test"), SentenceTransformer(str(tiny_model), device="cpu"))
    assert set(scores.per_query) == set(ids)
    for metric in PER_QUERY:
        mean = np.mean([v[metric] for v in scores.per_query.values()])
        assert mean == pytest.approx(scores[metric], abs=1e-12), metric


def validate_data(pairs_file):
    from finetune.config import DataConfig

    return DataConfig(path=str(pairs_file), columns=COLUMNS_PAIRS)


def test_no_difference_is_not_significant_and_a_consistent_gain_is():
    rng = np.random.default_rng(1)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.random(100))}
    same = paired_difference(base, dict(base), resamples=2000)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and not same["significant"]
    better = {q: min(1.0, v + 0.05 + 0.01 * rng.standard_normal()) for q, v in base.items()}
    gain = paired_difference(base, better, resamples=2000)
    assert gain["significant"] and gain["ci_low"] > 0 and gain["p_value"] < 0.01
    noise = {q: v + 0.2 * rng.standard_normal() for q, v in base.items()}
    assert paired_difference(base, noise, resamples=2000, seed=3) == paired_difference(
        base, noise, resamples=2000, seed=3
    )


def test_p_value_matches_exact_enumeration_of_sign_flips():
    """With 12 queries all 4096 sign patterns can be enumerated: the sampled p-value must agree with the exact one."""
    import itertools

    diffs = np.array([0.3, -0.1, 0.25, 0.0, 0.4, -0.2, 0.15, 0.05, 0.1, -0.05, 0.35, 0.2])
    base = {f"q{i}": 0.5 for i in range(12)}
    tuned = {f"q{i}": 0.5 + d for i, d in enumerate(diffs)}
    observed = abs(diffs.mean())
    flips = [abs((np.array(signs) * diffs).mean()) for signs in itertools.product((-1.0, 1.0), repeat=12)]
    exact = np.mean([f >= observed - 1e-12 for f in flips])
    got = paired_difference(base, tuned, resamples=40_000, seed=0)
    assert got["p_value"] == pytest.approx(exact, abs=0.004) and got["difference"] == pytest.approx(diffs.mean())


def test_interval_is_the_95_percent_bootstrap_interval_of_the_mean():
    """For 400 queries the bootstrap distribution of the mean is close to normal: mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(5)
    diffs = rng.normal(0.03, 0.2, size=400)
    base = {f"q{i}": 0.5 for i in range(400)}
    got = paired_difference(base, {q: 0.5 + d for q, d in zip(base, diffs)}, resamples=20_000, seed=1)
    half = 1.96 * diffs.std() / np.sqrt(len(diffs))
    assert got["ci_low"] == pytest.approx(diffs.mean() - half, abs=0.08 * half)
    assert got["ci_high"] == pytest.approx(diffs.mean() + half, abs=0.08 * half)
    assert got["significant"] == (got["ci_low"] > 0 or got["ci_high"] < 0)


def test_different_query_sets_are_refused():
    with pytest.raises(FinetuneError, match="not over the same queries"):
        paired_difference({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0})


def _adapter_run(tmp_path, tiny_model, pairs_file, name):
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, name=name)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").glob(f"{name}-*")
    return run_dir


def test_a_run_writes_per_query_scores_and_paired_intervals(tmp_path, tiny_model, pairs_file, capsys):
    run_dir = _adapter_run(tmp_path, tiny_model, pairs_file, "sig")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test_ids = json.loads((run_dir / "splits.json").read_text())["test"]
    rows = [json.loads(line) for line in (run_dir / "per_query.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"base", "tuned"} and len(rows) == 2 * len(test_ids)
    for model in ("base", "tuned"):
        mine = [r for r in rows if r["model"] == model]
        assert {r["query_id"] for r in mine} == set(test_ids)
        assert np.mean([r["ndcg@10"] for r in mine]) == pytest.approx(metrics[model]["ndcg@10"], abs=1e-12)
    sig = metrics["significance"]["ndcg@10"]
    assert sig["difference"] == pytest.approx(metrics["tuned"]["ndcg@10"] - metrics["base"]["ndcg@10"], abs=1e-12)
    assert (
        sig["ci_low"] <= sig["difference"] <= sig["ci_high"] and 0 < sig["p_value"] <= 1 and sig["n"] == len(test_ids)
    )
    out = capsys.readouterr().out
    assert "95% CI [" in out and f"paired over {len(test_ids)} test queries" in out
    per_query = {m: {r["query_id"]: r for r in rows if r["model"] == m} for m in ("base", "tuned")}
    assert compare_rows(per_query, seed=metrics.get("seed", 42))["ndcg@10"] == sig


def test_a_sweep_point_calls_its_queries_validation_queries(tmp_path, tiny_model, pairs_file, capsys):
    from finetune.recipe import load_recipe
    from finetune.run import run_recipe

    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, name="point")
    (tmp_path / "point.yaml").write_text(yaml.safe_dump(raw))
    run_dir = run_recipe(load_recipe(tmp_path / "point.yaml"), run_dir=str(tmp_path / "p"), selection=True)
    val_ids = json.loads((run_dir / "splits.json").read_text())["val"]
    out = capsys.readouterr().out
    assert f"paired over {len(val_ids)} validation queries" in out and "test queries" not in out


def test_compare_reports_intervals_and_refuses_a_foreign_per_query_file(tmp_path, tiny_model, pairs_file, capsys):
    first = _adapter_run(tmp_path, tiny_model, pairs_file, "one")
    second_raw = adapter_recipe(
        {"path": str(pairs_file), "columns": COLUMNS_PAIRS}, tiny_model, tmp_path, name="two", adapter={"type": "mlp"}
    )
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(second_raw))
    assert main(["run", str(tmp_path / "two.yaml"), f"splits.file={first / 'splits.json'}"]) == 0
    (second,) = (tmp_path / "runs").glob("two-*")
    out = tmp_path / "cmp"
    assert main(["compare", str(first), str(second), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "Δ NDCG@10 vs base [95% CI]" in table and "Best two:" in table
    report = json.loads((out / "comparison.json").read_text())
    assert all(r["ci"] for r in report["rows"]) and report["best_two"]["n"] > 0

    lines = (second / "per_query.jsonl").read_text().splitlines()
    (second / "per_query.jsonl").write_text("\n".join(lines[1:]) + "\n")  # one test query dropped by hand
    capsys.readouterr()
    assert main(["compare", str(first), str(second), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "per_query.jsonl: its base rows are not the run's test queries" in err[0]


def test_mean_interval_is_the_95_percent_bootstrap_interval_of_one_models_mean():
    rng = np.random.default_rng(7)
    values = rng.random(400)
    low, high = mean_interval(list(values), resamples=20_000, seed=2)
    half = 1.96 * values.std() / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.08 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.08 * half)


def test_every_query_can_be_drawn_by_the_bootstrap():
    """Only the first query (in id order) differs: a resampler that skipped it would give the interval [0, 0]."""
    base = {f"q{i}": 0.5 for i in range(3)}
    tuned = dict(base, q0=1.0)
    got = paired_difference(base, tuned, resamples=4000, seed=0)
    # q0 drawn in all 3 places has probability 1/27 > 2.5%, so the upper bound is the mean of three 0.5s
    assert (got["ci_low"], got["ci_high"]) == (0.0, pytest.approx(0.5))
    assert mean_interval([1.0, 0.0, 0.0], resamples=4000, seed=0) == (0.0, pytest.approx(1.0))


def test_sign_flips_that_tie_the_observed_difference_count():
    """Four equal gains: exactly 2 of the 16 sign patterns reach the observed |mean|, so p is 1/8, not ~0."""
    base = {f"q{i}": 0.25 for i in range(4)}
    got = paired_difference(base, {q: 0.75 for q in base}, resamples=40_000, seed=0)
    assert got["p_value"] == pytest.approx(2 / 16, abs=0.005)
