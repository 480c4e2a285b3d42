"""The shape of ``finetune/`` (issue 35): an acyclic, layered import graph, functions that read in
one screen, runners under 300 lines, kinds known by the registry only, and a kind added without
editing the shared modules (``tests/toy_kind.py``, as docs/architecture.md's "Add a kind" says).

The structural checks read the source with ``ast`` (imports inside functions count too); each takes
the package folder, so a planted bug in a copy of it can be shown to fail them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
KIND_PACKAGES = ("adapter", "qlora", "cross", "reranker")
# top to bottom; a module may import its own layer or any below it, never one above
LAYERS = (
    {"finetune", "finetune.cli", "finetune.__main__"},  # the package re-exports the public API
    {"finetune.sweep", "finetune.sweep_report", "finetune.compare", "finetune.vector_db", "finetune.export_command"},
    {"finetune.run"},
    {"finetune.recipe"},
    {"finetune.kinds"},
    KIND_PACKAGES,  # the kinds' own packages
)
KIND_NAMES = ("adapter", "qlora", "cross_adapter", "reranker")


def modules(package: Path = PACKAGE) -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every file of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from finetune.x import y`` counts ``finetune.x.y``
    when that is a module, else ``finetune.x``)."""
    trees = modules(package)
    graph = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in trees else node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in trees}
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """0 for the CLI, ... 5 for a kind's package, 6 for the ground floor (config, evaluation, memory, ...)."""
    for i, members in enumerate(LAYERS):
        if module in members or any(module.startswith(f"finetune.{p}.") or module == f"finetune.{p}" for p in members):
            return i
    return len(LAYERS)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) < layer(a)]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def long_functions(package: Path = PACKAGE, limit: int = 60) -> list[str]:
    """Functions (and methods) over ``limit`` lines, counted from ``def`` to their last line, docstring included."""
    out = []
    for name, tree in modules(package).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{name}.{node.name}: {lines} lines")
    return out


def kind_name_comparisons(package: Path = PACKAGE) -> list[str]:
    """``x == "qlora"``, ``kind in ("adapter", ...)`` and the like outside ``kinds.py`` and the kinds' packages."""
    out = []
    for name, tree in modules(package).items():
        if layer(name) >= 4 and layer(name) <= 5:  # kinds.py and the kinds' own packages may name kinds
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in KIND_NAMES for v in values):
                    out.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_import_cycle_between_files_or_packages():
    graph = import_graph()
    assert cycles(graph) == []
    packages = {}
    for a, targets in graph.items():
        others = {package_of(b) for b in targets} - {package_of(a)}
        packages.setdefault(package_of(a), set()).update(others)
    assert cycles(packages) == []


def test_no_import_runs_from_a_lower_layer_back_up():
    assert upward_imports(import_graph()) == []


def test_the_layers_name_real_modules():
    """A renamed module must not silently drop out of its layer (and so out of the check)."""
    names = set(modules())
    for members in LAYERS:
        for member in members:
            assert member in names or f"finetune.{member}" in names, member


def test_no_function_is_over_60_lines():
    assert long_functions() == []


def test_no_runner_module_is_over_300_lines():
    runners = sorted(PACKAGE.glob("*/runner.py"))
    assert len(runners) == len(KIND_PACKAGES)
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in runners}
    assert all(n <= 300 for n in sizes.values()), sizes


def test_no_kind_name_is_compared_outside_the_registry_and_the_kinds():
    assert kind_name_comparisons() == []


# --- adding a kind touches none of run.py, sweep.py, cli.py, field_rules.py ---------------------------


@pytest.fixture
def toy_kind(monkeypatch):
    """Register ``tests/toy_kind.py`` as the ``toy`` kind: the one line docs/architecture.md's step 4 adds."""
    from toy_kind import ToyRecipe

    from finetune.kinds import KINDS, RecipeKind

    kind = RecipeKind("toy", ToyRecipe, "toy_kind:ToyRun", "toy_kind", caches_embeddings=False, resumable=False)
    monkeypatch.setitem(KINDS, "toy", kind)
    return kind


def _toy_recipe(tmp_path: Path, pairs_file: Path, **toy) -> Path:
    from conftest import COLUMNS_PAIRS

    raw = {
        "kind": "toy",
        "name": "toy",
        "data": {"path": str(pairs_file), "columns": COLUMNS_PAIRS},
        "output": {"dir": str(tmp_path / "runs")},
        "toy": toy,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_toy_kind_runs_end_to_end_through_the_cli(toy_kind, tmp_path, pairs_file):
    from finetune.cli import main

    recipe = _toy_recipe(tmp_path, pairs_file, weighting="vowels", vowel_weight=3.0)
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kind"] == "toy" and metrics["vowel_weight"] == 3.0
    assert metrics["base"]["ndcg@10"] != metrics["tuned"]["ndcg@10"]  # the weighting acted
    assert "significance" in metrics and (run_dir / "per_query.jsonl").is_file()
    assert json.loads((run_dir / "toy_weights.json").read_text())[0] == 3.0
    assert {"recipe.yaml", "splits.json", "versions.json"} <= {p.name for p in run_dir.iterdir()}


def test_a_toy_kind_has_its_rules_checked_and_classified(toy_kind, tmp_path, pairs_file):
    from test_field_rules import _leaves

    from finetune.cli import main
    from finetune.errors import FinetuneError
    from finetune.recipe import load_recipe

    with pytest.raises(FinetuneError, match=r"toy\.vowel_weight=3\.0 has no effect unless toy\.weighting is vowels"):
        load_recipe(_toy_recipe(tmp_path, pairs_file, vowel_weight=3.0))
    ruled = {r.path for r in toy_kind.field_rules()}
    assert not [p for p in _leaves(toy_kind.schema) if p not in toy_kind.always_fields() and not any(
        p == r or p.startswith(r + ".") for r in ruled)]  # fmt: skip
    assert main(["run", str(_toy_recipe(tmp_path, pairs_file)), "--resume", "latest"]) == 2  # not resumable


def test_a_toy_kind_sweeps_and_its_final_run_scores_test(toy_kind, tmp_path, pairs_file):
    from finetune.sweep import run_sweep

    recipe = _toy_recipe(tmp_path, pairs_file, weighting="vowels")
    out = run_sweep(str(recipe), ["toy.vowel_weight=0.5,4"], directory=str(tmp_path / "sweep"), echo=lambda *_: None)
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["points"]) == 2 and not list((out / "points").glob("*/toy_weights.json"))  # points export nothing
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["scored_split"] == "test" and (out / "final" / "toy_weights.json").is_file()
