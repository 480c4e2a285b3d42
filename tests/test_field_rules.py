"""No setting silently ignored: every field of every recipe kind has an effect or the recipe is refused."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from finetune.errors import FinetuneError
from finetune.field_rules import ineffective
from finetune.kinds import KINDS
from finetune.recipe import apply_overrides, load_recipe, validate_recipe

FAQ = {"type": "builtin", "name": "construction-faq"}
BASE = {kind: {"kind": kind, "data": FAQ} for kind in ("adapter", "qlora", "cross_adapter", "reranker")}
BASE["reranker"]["retriever"] = {"name": "sentence-transformers/all-MiniLM-L6-v2"}  # the one required section


def _leaves(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _leaves(annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_is_classified(kind):
    """A new field must say when it has an effect (a rule) or that it always does (ALWAYS)."""
    ruled = {r.path for r in KINDS[kind].field_rules()}
    always = KINDS[kind].always_fields()
    unclassified = [
        path
        for path in _leaves(KINDS[kind].schema)
        if path not in always and not any(path == p or path.startswith(p + ".") for p in ruled)
    ]
    assert not unclassified, f"{kind}: add these to {KINDS[kind].rules}.RULES or ALWAYS: {unclassified}"


CASES = [(kind, rule) for kind in sorted(KINDS) for rule in KINDS[kind].field_rules()]


@pytest.mark.parametrize("kind, rule", CASES, ids=[f"{k}:{r.path}:{i}" for i, (k, r) in enumerate(CASES)])
def test_each_rule_refuses_its_witness(kind, rule):
    raw = apply_overrides(BASE[kind], list(rule.witness))
    with pytest.raises(FinetuneError) as caught:
        validate_recipe(raw)
    message = str(caught.value)
    named = message.split(" has no effect unless")[0]  # the inert field, not one a fix mentions after it
    assert re.search(rf"(^|: ){re.escape(rule.path)}=", named) and "remove it" in message, message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_defaults_set_nothing_inert(kind):
    recipe = validate_recipe(dict(BASE[kind]))
    assert recipe.kind == kind and ineffective(recipe, KINDS[kind].field_rules()) == []


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_found():
    """Found from the test file, not the working directory, so they are never silently skipped."""
    assert {"recipes/adapter.yaml", "recipes/qlora.yaml", "recipes/cross_adapter.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("recipe", SHIPPED)
def test_shipped_recipes_set_nothing_inert(recipe, monkeypatch):
    """Every shipped recipe validates, sets nothing inert, and starts with the command that runs it."""
    monkeypatch.chdir(ROOT)
    loaded = load_recipe(recipe)
    assert ineffective(loaded, KINDS[loaded.kind].field_rules()) == []
    assert f"python -m finetune run {recipe}" in Path(recipe).read_text().split("kind:")[0]


def test_data_path_override_reads_that_data(beir_dir):
    """The new-user case: data.path on a builtin recipe trains on the given folder, not the FAQ."""
    recipe = load_recipe("recipes/adapter.yaml", [f"data.path={beir_dir}"])
    assert (recipe.data.type, recipe.data.path, recipe.data.name) == ("beir", str(beir_dir), None)


def test_a_builtin_type_with_a_path_is_refused(beir_dir):
    with pytest.raises(
        FinetuneError,
        match=r"data\.path=.* has no effect unless data\.type is pairs, beir or hf; remove it .*, or pass data=PATH",
    ):
        load_recipe("recipes/adapter.yaml", [f"data.path={beir_dir}", "data.type=builtin"])


def test_an_hf_path_wins_over_data_name(tmp_path):
    """An hf recipe reads a save_to_disk folder when data.path is set, so a data.name beside it is inert."""
    with pytest.raises(FinetuneError, match=r"data\.name='org/set' has no effect unless data\.type is builtin, or hf"):
        validate_recipe({"kind": "adapter", "data": {"type": "hf", "path": str(tmp_path), "name": "org/set"}})
    assert validate_recipe({"kind": "adapter", "data": {"type": "hf", "name": "org/set"}}).data.name == "org/set"


def test_the_message_names_the_file_field_and_fix():
    with pytest.raises(FinetuneError) as caught:
        load_recipe("recipes/adapter.yaml", ["negatives.range_min=3"])
    assert str(caught.value) == (
        "recipes/adapter.yaml: negatives.range_min=3 has no effect unless negatives.strategy is mined or bm25; "
        "remove it (on the command line: negatives.range_min=0, its default)"
    )


def test_max_steps_caps_the_epochs(tiny_model, pairs_file, tmp_path):
    """Both settings act: max_steps stops early, epochs stop a step limit that is longer than the epochs."""
    from finetune.data import load_data
    from finetune.qlora import train as training
    from finetune.qlora.runner import QLoRARun
    from finetune.splits import make_splits

    columns = {"query": "question", "positive": "answer", "id": "id"}
    raw = {
        "kind": "qlora",
        "model": {"name": str(tiny_model)},
        "data": {"path": str(pairs_file), "columns": columns},
        "train": {"epochs": 2, "batch_size": 8, "max_steps": 1000},
    }
    recipe = validate_recipe(raw)
    data = load_data(recipe.data)
    run = QLoRARun(recipe, data, make_splits(data, recipe.splits, recipe.seed), "cpu")
    rows = len(training.train_dataset(run.data, run.splits.train, run.negatives))
    assert training.max_steps(recipe.train, rows) == 2 * -(-rows // 8)
    recipe.train.max_steps = 3
    assert training.max_steps(recipe.train, rows) == 3


ACCEPTED = [  # a field set where its rule says it acts: the rule must not refuse it (the accepting side)
    ("adapter", ("splits.group_by_domain=true",)),  # builtin data has domains
    ("adapter", ("data.type=pairs", "data.name=null", "data.path=x.jsonl", "data.columns.domain=category",
                 "splits.group_by_domain=true")),
    ("adapter", ("negatives.strategy=random", "negatives.pool=file", "negatives.file=n.txt")),
    ("adapter", ("negatives.strategy=mined", "negatives.range_min=2", "negatives.max_score=0.9")),
    ("qlora", ("negatives.strategy=bm25", "negatives.range_max=30")),
    ("cross_adapter", ("domains.per_domain=true", "domains.min_queries=4")),
    ("cross_adapter", ("domains.leave_one_domain_out=true", "domains.min_queries=4")),
    ("cross_adapter", ("domains.per_domain=true", "domains.test_fraction=0.5")),
]  # fmt: skip


@pytest.mark.parametrize("kind, overrides", ACCEPTED, ids=[f"{k}:{o[-1]}" for k, o in ACCEPTED])
def test_a_field_where_it_acts_is_accepted(kind, overrides):
    recipe = validate_recipe(apply_overrides(BASE[kind], list(overrides)))
    path, value = overrides[-1].split("=", 1)
    section, field = path.split(".")
    assert str(getattr(getattr(recipe, section), field)).lower() == value.lower()
