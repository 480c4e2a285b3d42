"""Mutation check: plant small bugs in the modules that hold the claims, and count how many the tests catch.

Each mutant changes one thing in one function of a module (a comparison flipped, an arithmetic
operator swapped, a constant moved, ``and``/``or`` exchanged, a ``not`` dropped, a boolean negated,
a call's keyword argument removed) and runs that module's tests, in a copy of the repository, with
``pytest -x``. A mutant is *killed* when a test fails, *survives* when all pass, and *times out*
(counted as killed, as mutmut does) when the tests hang past ``--timeout``. The killed share and
every survivor (file, line, the change) go to ``benchmarks/results/mutation.json``; each survivor
is then explained there by hand (``--explain FILE``: a JSON map of mutant id -> reason).

    python benchmarks/mutation.py                           # every module below: 70 minutes on 2 busy cores
    python benchmarks/mutation.py --modules finetune/significance.py --limit 20

An equivalent of ``mutmut`` (on PyPI), kept small: mutmut 3 runs the whole suite first to map
tests to lines, seven minutes here before the first mutant; this maps each module to its tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# module -> the tests that guard its claims (what a developer would run after changing it), a pytest -k
# selection where the file holds slow tests for other claims, and the functions mutated (None: all)
MODULES = {
    "finetune/evaluation.py": {"tests": ["tests/test_evaluation.py", "tests/test_significance.py"]},
    "finetune/significance.py": {"tests": ["tests/test_significance.py"]},
    **{
        rules: {"tests": ["tests/test_field_rules.py", "tests/test_bad_input.py"]}
        for rules in (
            "finetune/field_rules.py",
            "finetune/adapter/rules.py",
            "finetune/qlora/rules.py",
            "finetune/cross/rules.py",
        )
    },
    "finetune/adapter/checkpoint.py": {
        "tests": ["tests/test_resume.py", "tests/test_adapter.py"],
        "k": "dropout or half or refuse or keep_best or early_stopping",
    },
    "finetune/qlora/trainer.py": {
        "tests": ["tests/test_resume.py"],
        "k": "half",
        "functions": ["latest_checkpoint"],
    },
    "finetune/qlora/stack.py": {"tests": ["tests/test_checkpoint_stack.py"], "functions": ["check_fidelity"]},
    "finetune/adapter/runner.py": {"tests": ["tests/test_exported_model.py"], "functions": ["_check_export"]},
    "finetune/qlora/export.py": {
        "tests": ["tests/test_exported_model.py", "tests/test_qlora.py"],
        "functions": ["check_export", "save"],
    },
    "finetune/cross/runner.py": {"tests": ["tests/test_exported_model.py"], "functions": ["_check_export", "_export"]},
}
SWAP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


def mutants(source: str, functions: list[str] | None = None) -> list[dict]:
    """Every single-point mutation of ``source`` inside a function body (of ``functions``, when given):
    ``{"line", "change", "source"}``."""
    tree = ast.parse(source)
    bodies = [
        f
        for f in ast.walk(tree)
        if isinstance(f, ast.Lambda)
        and functions is None
        or isinstance(f, ast.FunctionDef)
        and (functions is None or f.name in functions)
    ]
    inside = {id(n) for f in bodies for n in ast.walk(f)}
    sites = [n for n in ast.walk(tree) if id(n) in inside]
    out = []
    for node in sites:
        for change, apply in _changes(node):
            undo = apply()
            try:
                out.append({"line": node.lineno, "change": change, "source": ast.unparse(tree)})
            finally:
                undo()
    return out


def _changes(node):
    """(description, apply) pairs for one node; ``apply()`` mutates in place and returns its undo."""

    def setattr_undo(obj, attr, value):
        def apply():
            old = getattr(obj, attr)
            setattr(obj, attr, value)
            return lambda: setattr(obj, attr, old)

        return apply

    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAP:
                ops = list(node.ops)
                ops[i] = SWAP[type(op)]()
                yield f"{type(op).__name__} -> {type(ops[i]).__name__}", setattr_undo(node, "ops", ops)
    elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAP:
        new = SWAP[type(node.op)]()
        yield f"{type(node.op).__name__} -> {type(new).__name__}", setattr_undo(node, "op", new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "drop not", setattr_undo(node, "op", ast.UAdd())
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
        new = node.value + 1 if isinstance(node.value, int) else node.value * 2 or 1.0
        yield f"{node.value!r} -> {new!r}", setattr_undo(node, "value", new)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield f"{node.value} -> {not node.value}", setattr_undo(node, "value", not node.value)
    elif isinstance(node, ast.Call):
        for i, kw in enumerate(node.keywords):
            if kw.arg is not None:
                kept = node.keywords[:i] + node.keywords[i + 1 :]
                yield f"drop {kw.arg}=", setattr_undo(node, "keywords", kept)


def run_tests(spec: dict, timeout: float) -> str:
    """Run ``spec``'s tests in this process: torch and sentence-transformers stay imported, the project and
    the test modules are imported afresh, so the mutant is what they see (seconds per mutant, not the ten
    that a new interpreter's imports cost). Subprocesses the tests start import the mutant from disk."""
    import pytest

    for name in [m for m in sys.modules if m.split(".")[0] in ("finetune", "conftest", "families", "fake_openai")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m.startswith("test_") or m.startswith("tests.")]:
        del sys.modules[name]

    def alarm(*_):
        raise TimeoutError("mutant timed out")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *spec["tests"]]
        code = pytest.main(args + (["-k", spec["k"]] if "k" in spec else []))
    except TimeoutError:
        return "timeout"
    finally:
        signal.alarm(0)
    return "survived" if code == 0 else "killed"


def check_module(copy: Path, module: str, spec: dict, timeout: float, limit: int | None) -> list[dict]:
    """Every mutant of ``module`` against its tests, in a worker process that runs from the copy."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", module, "--timeout", str(timeout), "--limit", str(limit or 0)],
        cwd=copy,
        env=dict(os.environ, PYTHONPATH=str(copy), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line[len("MUTANT ") :]) for line in done.stdout.splitlines() if line.startswith("MUTANT ")]
    if not rows:
        raise SystemExit(f"{module}: the worker reported nothing\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return rows


def worker(module: str, timeout: float, limit: int) -> int:
    """In the copy: check the tests pass unmutated, then each mutant in turn; one ``MUTANT {json}`` line each."""
    spec, path = MODULES[module], Path(module)
    original = path.read_text()
    if run_tests(spec, timeout * 3) != "survived":
        raise SystemExit(f"{spec['tests']} fail before any mutation")
    found = mutants(original, spec.get("functions"))
    try:
        for i, m in enumerate(found[: limit or None]):
            path.write_text(m["source"])
            t0 = time.perf_counter()
            outcome = run_tests(spec, timeout)
            row = {"id": f"{module}:{m['line']}:{i}", "line": m["line"], "change": m["change"], "outcome": outcome}
            print("MUTANT " + json.dumps(row | {"seconds": round(time.perf_counter() - t0, 1)}), flush=True)
            print(f"{module}:{m['line']} {m['change']}: {outcome}", file=sys.stderr, flush=True)
    finally:
        path.write_text(original)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--limit", type=int, default=None, help="at most N mutants per module")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests")
    parser.add_argument("--explain", type=Path, default=None, help="JSON: survivor id -> why it is not a gap")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation.json")
    parser.add_argument("--explain-only", action="store_true", help="rewrite --out with --explain, run nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.timeout, args.limit or 0)
    copy = Path(tempfile.mkdtemp(prefix="mutation-")) / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", ".gpu_proof*", "__pycache__"))
    before = json.loads(args.out.read_text()) if args.out.is_file() else {}
    previous = before.get("modules", {})
    modules = {m: rows for m, rows in previous.items() if m in MODULES}  # modules since moved are dropped
    runs = before.get("runs", []) + (
        [] if args.explain_only else [{"date": time.strftime("%Y-%m-%d %H:%M"), "modules": args.modules}]
    )
    for module in [] if args.explain_only else args.modules:
        modules[module] = check_module(copy, module, MODULES[module], args.timeout, args.limit)
    explained = json.loads(args.explain.read_text()) if args.explain else {}
    rows = [r for rs in modules.values() for r in rs]
    for r in rows:
        if r["outcome"] == "survived" and r["id"] in explained:
            r["why_not_a_gap"] = explained[r["id"]]
    killed = sum(r["outcome"] != "survived" for r in rows)
    equivalent = sum(r.get("why_not_a_gap", "").startswith("equivalent") for r in rows if r["outcome"] == "survived")
    summary = {
        module: {"mutants": len(rs), "killed": sum(r["outcome"] != "survived" for r in rs)}
        for module, rs in modules.items()
    }
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import write_result

    write_result(
        "mutation",
        {
            "killed_share": killed / len(rows) if rows else None,
            # the usual mutation score: equivalent mutants (no test could tell them apart) left out
            "killed_share_of_non_equivalent": killed / (len(rows) - equivalent) if rows else None,
            "runs": runs,
            "target": 0.9,
            "by_module": summary,
            "survivors": [r for r in rows if r["outcome"] == "survived"],
            "modules": modules,
        },
        args.out,
    )
    print(
        json.dumps(summary, indent=1), f"killed {killed}/{len(rows)}; {equivalent} survivors explained as equivalent"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
