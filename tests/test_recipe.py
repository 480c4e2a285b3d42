from pathlib import Path

import pytest
import yaml

from finetune.errors import FinetuneError
from finetune.recipe import apply_overrides, load_recipe, validate_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert RECIPES, "no recipes shipped"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must start with a comment"
    head = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    assert f"python -m finetune run recipes/{path.name}" in head
    recipe = load_recipe(path)
    assert recipe.kind == yaml.safe_load(text)["kind"]


def test_overrides_set_nested_values_with_yaml_types():
    raw = apply_overrides(
        {"train": {"lr": 0.1}}, ["train.lr=0.01", "train.patience=null", "seed=7", "splits.group_by_domain=true"]
    )
    assert raw == {"train": {"lr": 0.01, "patience": None}, "seed": 7, "splits": {"group_by_domain": True}}


def test_override_applied_through_load_recipe(beir_dir):
    recipe = load_recipe(RECIPES[0], ["adapter.type=mlp", "train.epochs=2", f"data={beir_dir}"])
    assert recipe.adapter.type == "mlp" and recipe.train.epochs == 2
    assert recipe.data.type == "beir"


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_override_is_one_clear_error(bad):
    with pytest.raises(FinetuneError, match="key.sub=value"):
        apply_overrides({}, [bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(FinetuneError, match="'data' is 'x.jsonl', not a mapping"):
        apply_overrides({"data": "x.jsonl"}, ["data.columns.query=q"])


def test_unknown_key_gives_did_you_mean(tmp_path):
    with pytest.raises(FinetuneError) as err:
        load_recipe(RECIPES[0], ["train.epoch=3"])
    assert "train.epoch: unknown field (did you mean 'epochs'?)" in str(err.value)
    assert str(err.value).startswith(str(RECIPES[0]))
    assert "\n" not in str(err.value)


def test_wrong_type_and_range_are_named():
    with pytest.raises(FinetuneError, match=r"train.lr: .*greater than 0"):
        load_recipe(RECIPES[0], ["train.lr=-1"])
    with pytest.raises(FinetuneError, match=r"train.epochs: .*integer.*'many'"):
        load_recipe(RECIPES[0], ["train.epochs=many"])


def test_fractions_must_leave_training_queries():
    with pytest.raises(FinetuneError, match="test_fraction \\+ val_fraction must be < 1"):
        load_recipe(RECIPES[0], ["splits.test_fraction=0.6", "splits.val_fraction=0.5"])


@pytest.mark.parametrize("kind,message", [(None, "kind: missing"), ("adaptor", "did you mean 'adapter'")])
def test_kind_is_checked(kind, message):
    raw = {"data": "construction-faq"} | ({"kind": kind} if kind else {})
    with pytest.raises(FinetuneError, match=message):
        validate_recipe(raw, "r.yaml")


def test_data_type_is_inferred(tmp_path, beir_dir, pairs_file):
    assert validate_recipe({"kind": "adapter", "data": "construction-faq"}).data.type == "builtin"
    assert validate_recipe({"kind": "adapter", "data": str(beir_dir)}).data.type == "beir"
    assert validate_recipe({"kind": "adapter", "data": str(pairs_file)}).data.type == "pairs"
    assert validate_recipe({"kind": "adapter", "data": {"name": "org/set"}}).data.type == "hf"


def test_file_errors(tmp_path):
    with pytest.raises(FinetuneError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(FinetuneError, match="file is empty"):
        load_recipe(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: adapter\ndata: [unclosed\n")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        load_recipe(broken)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("kind: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        load_recipe(evil)
