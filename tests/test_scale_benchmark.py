"""benchmarks/scale.py's arithmetic: the growth exponent and the one-epoch projection it reports beside the runs."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale  # noqa: E402


def test_growth_is_the_log_log_slope():
    sizes = [10_000, 30_000, 100_000]
    assert scale.growth(sizes, [2.0 * n**0.8 for n in sizes]) == pytest.approx(0.8)
    assert scale.growth(sizes, [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert scale.growth([10_000], [1.0]) is None  # one size has no slope


def qlora_row(n: int, val_documents: int, validation_s: float, calls: int) -> dict:
    stages = {
        "encoding": {"seconds": 0.01 * n, "calls": 2},
        "validation": {"seconds": validation_s, "calls": calls},
        "training": {"seconds": 80.0, "calls": 1},
        "as-trained check": {"seconds": 50.0, "calls": 1},
        "test evaluation": {"seconds": 0.001 * n, "calls": 2},
    }
    return {
        "n_corpus": n,
        "val_documents": val_documents,
        "stages": stages,
        "train_rows": 5579,
        "train_steps": 8,
        "batch_size": 32,
        "step_time": {"first_s": 30.0, "median_s": 10.0},
    }


def test_the_projection_keeps_validation_at_the_cap_and_trains_one_epoch():
    rows = {"qlora": {"10000": qlora_row(10_000, 10_000, 60.0, 1), "30000": qlora_row(30_000, 20_000, 240.0, 2)}}
    exponents = {"qlora": {"encoding": 1.0, "validation": 1.26, "training": 0.0, "as-trained check": 0.0}}
    got = scale.projection(rows, exponents, n=100_000)
    s = got["seconds"]
    assert got["epoch_steps"] == math.ceil(5579 / 32) == 175
    assert s["training"] == pytest.approx(175 * 10.0 + 30.0 - 10.0)  # one epoch; the first step is slower
    assert s["validation"] == pytest.approx(120.0)  # the cap's cost per call, once an epoch, not grown with N
    assert s["encoding"] == pytest.approx(1000.0)  # 300 s at 3 x 10^4, grown as N^1
    assert s["as-trained check"] == pytest.approx(50.0)
    assert s["test evaluation"] == pytest.approx(100.0)  # no exponent measured: linear
    wall = sum(s.values())
    assert got["validation_share"] == pytest.approx(120.0 / wall)
    assert got["overhead_share"] == pytest.approx((120.0 + 50.0) / wall)


def test_no_projection_from_one_size_or_before_the_candidate_set_is_capped():
    one = {"qlora": {"30000": qlora_row(30_000, 20_000, 240.0, 1)}}
    assert scale.projection(one, {"qlora": {}}) is None
    uncapped = {"qlora": {"3000": qlora_row(3_000, 3_000, 6.0, 1), "10000": qlora_row(10_000, 10_000, 60.0, 1)}}
    assert scale.projection(uncapped, {"qlora": {}}) is None


def test_a_run_at_the_projected_size_keeps_its_measured_stages_and_extends_only_training():
    rows = {"qlora": {"30000": qlora_row(30_000, 20_000, 240.0, 1), "100000": qlora_row(100_000, 20_000, 250.0, 1)}}
    exponents = {"qlora": {"encoding": 1.0, "validation": 0.03, "training": 0.0, "test evaluation": 1.0}}
    s = scale.projection(rows, exponents, n=100_000)["seconds"]
    assert s["encoding"] == pytest.approx(1000.0) and s["test evaluation"] == pytest.approx(100.0)
    assert s["validation"] == pytest.approx(250.0) and s["as-trained check"] == pytest.approx(50.0)
    assert s["training"] == pytest.approx(175 * 10.0 + 20.0)


def test_the_targets_say_whether_the_qlora_run_trained_a_whole_epoch():
    bounded = {"qlora": {"100000": qlora_row(100_000, 20_000, 250.0, 1)}}
    assert scale.targets(bounded)["qlora"]["one_epoch"] is False
    bounded["qlora"]["100000"]["train_steps"] = 175
    assert scale.targets(bounded)["qlora"]["one_epoch"] is True
