"""Broken inputs: each exits with status 2 and one line naming the file/field/line and the fix,
and leaves no run directory behind (a run stopped by a NaN loss keeps its last good checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import adapter_recipe, make_pairs, write_beir

from finetune.cli import main

COLUMNS = {"query": "question", "positive": "answer", "id": "id", "domain": "category"}


@pytest.fixture
def world(tmp_path, tiny_model, pairs_file):
    """A valid adapter recipe (tiny model, quick schedule) that each case breaks in one place."""
    raw = adapter_recipe({"path": str(pairs_file), "columns": COLUMNS}, tiny_model, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# python -m finetune run recipe.yaml\n" + yaml.safe_dump(raw))
    return tmp_path, str(recipe), raw


def _error_line(stderr: str) -> str:
    """The one error line (progress bars of model loading may precede it on stderr); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _beir(tmp_path: Path, qrels_line: str) -> str:
    folder = write_beir(tmp_path / "beir")
    with (folder / "qrels" / "train.tsv").open("a") as f:
        f.write(qrels_line)
    return str(folder)


def _bytes(tmp_path: Path, name: str, raw: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def _latin1_pairs(tmp_path: Path, suffix: str) -> str:
    """A pair file saved as Latin-1: its third line holds 'é' as the single byte 0xe9."""
    if suffix == ".csv":
        raw = "question,answer\nwhat is a,it is a\nwhat is caf\xe9,a place\n".encode("latin-1")
    else:
        rows = [{"question": "what is a", "answer": "it is a"}, {"question": "x", "answer": "y"}]
        rows.append({"question": "what is caf\xe9", "answer": "a place"})
        raw = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("latin-1")
    return _bytes(tmp_path, f"latin1{suffix}", raw)


def _beir_with(tmp_path: Path, file: str, edit) -> str:
    """The BEIR folder with ``file`` rewritten by ``edit`` (bytes -> bytes)."""
    folder = write_beir(tmp_path / "beir")
    (folder / file).write_bytes(edit((folder / file).read_bytes()))
    return str(folder)


def _unfinished_run(tmp_path, recipe) -> Path:
    """A finished run made unfinished again (its metrics.json removed), so --resume takes it."""
    run = tmp_path / "broken-run"
    assert main(["run", recipe, "--run-dir", str(run)]) == 0
    (run / "metrics.json").unlink()
    return run


def _wrong_shape_checkpoint(tmp_path, recipe) -> list[str]:
    """An unfinished run whose checkpoint holds a 16-d adapter for a 32-d model."""
    run = _unfinished_run(tmp_path, recipe)
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    state["adapter"] = {k: v[..., :16] if v.ndim else v for k, v in state["adapter"].items()}
    torch.save(state, run / "checkpoint" / "state.pt")
    return [recipe, "--resume", str(run)]


def _truncated_checkpoint(tmp_path, recipe) -> list[str]:
    run = _unfinished_run(tmp_path, recipe)
    ckpt = run / "checkpoint" / "state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    return [recipe, "--resume", str(run)]


def _qlora(tmp_path, raw, **top) -> str:
    q = {"kind": "qlora", "model": raw["model"], "data": raw["data"], "output": raw["output"], **top}
    return _file(tmp_path, "qlora.yaml", yaml.safe_dump(q))


def _model_copy(tmp_path, raw, name: str, file: str, edit) -> str:
    """A copy of the tiny model in ``tmp_path/name`` whose JSON ``file`` is changed by ``edit`` (in place)."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(raw["model"]["name"], folder)
    content = json.loads((folder / file).read_text())
    edit(content)
    (folder / file).write_text(json.dumps(content))
    return str(folder)


def _broken_checkpoint(tmp_path, raw) -> str:
    """A copy of the tiny model whose modules.json names a module folder that is not there."""
    return _model_copy(tmp_path, raw, "broken-model", "modules.json", lambda m: m[1].update(path="2_NoSuchPooling"))


def _maskless_tokenizer(tmp_path, raw) -> str:
    """A QLoRA recipe on a copy of the tiny model whose tokenizer returns no attention mask (mean pooling would
    average padding)."""
    folder = _model_copy(
        tmp_path,
        raw,
        "maskless-model",
        "tokenizer_config.json",
        lambda c: c.update(model_input_names=["input_ids", "token_type_ids"]),
    )
    return _qlora(tmp_path, dict(raw, model={"name": folder}))


# (id, how to build the command from (tmp_path, recipe path, raw recipe), expected fragments of the one-line message)
CASES = [
    ("unknown key", lambda t, r, raw: [r, "train.epoch=3"], ["train.epoch: unknown field (did you mean 'epochs'?)"]),
    (
        "unknown section",
        lambda t, r, raw: [r, "negative.strategy=mined"],
        ["negative: unknown field (did you mean 'negatives'?)"],
    ),
    (
        "unknown kind",
        lambda t, r, raw: [r, "kind=adaptor"],
        ["kind: 'adaptor' is not a recipe kind (did you mean 'adapter'?)"],
    ),
    (
        "wrong type",
        lambda t, r, raw: [r, "train.epochs=many"],
        ["train.epochs: Input should be a valid integer", "'many'"],
    ),
    ("missing recipe", lambda t, r, raw: [str(t / "nope.yaml")], ["nope.yaml: file not found"]),
    ("empty recipe", lambda t, r, raw: [_file(t, "empty.yaml", "")], ["empty.yaml: file is empty"]),
    (
        "malformed yaml",
        lambda t, r, raw: [_file(t, "bad.yaml", "kind: adapter\ntrain: [1, 2\n")],
        ["bad.yaml line", "not valid YAML"],
    ),
    (
        "missing data file",
        lambda t, r, raw: [r, f"data.path={t / 'gone.jsonl'}"],
        ["gone.jsonl: file not found; check data.path"],
    ),
    ("empty data file", lambda t, r, raw: [r, f"data.path={_file(t, 'e.jsonl', '')}"], ["e.jsonl: file is empty"]),
    (
        "malformed jsonl line",
        lambda t, r, raw: [
            r,
            f"data.path={_file(t, 'm.jsonl', json.dumps(make_pairs(2)[0]) + chr(10) * 2 + '{oops' + chr(10))}",
        ],
        ["m.jsonl line 3: malformed JSON"],
    ),
    (
        "missing column",
        lambda t, r, raw: [r, "data.columns.query=qestion"],
        ["no column 'qestion' for the query (did you mean 'question'?)", "data.columns.query"],
    ),
    (
        "duplicate ids",
        lambda t, r, raw: [
            r,
            f"data.path={_file(t, 'd.jsonl', ''.join(json.dumps(dict(x, id='same')) + chr(10) for x in make_pairs(2)))}",  # noqa: E501
        ],
        ["d.jsonl row 2: duplicate id 'same'"],
    ),
    (
        "jsonl not utf-8",
        lambda t, r, raw: [r, f"data.path={_latin1_pairs(t, '.jsonl')}"],
        ["latin1.jsonl line 3: not UTF-8 text (byte 0xe9 at column 26); save the file as UTF-8"],
    ),
    (
        "csv not utf-8",
        lambda t, r, raw: [r, f"data.path={_latin1_pairs(t, '.csv')}"],
        ["latin1.csv line 3: not UTF-8 text (byte 0xe9 at column 12)"],
    ),
    (
        "beir corpus not utf-8",
        lambda t, r, raw: [r, "data=" + _beir_with(t, "corpus.jsonl", lambda b: b.replace(b"issue 5", b"issu\xe9 5"))],
        ["corpus.jsonl line 6: not UTF-8 text"],
    ),
    (
        "beir qrels not utf-8",
        lambda t, r, raw: [r, "data=" + _beir_with(t, "qrels/train.tsv", lambda b: b + b"q1\tdoc\xff\t1\n")],
        ["train.tsv line 32: not UTF-8 text (byte 0xff at column 7)"],
    ),
    (
        "beir document with neither text nor title",
        lambda t, r, raw: [
            r,
            "data=" + _beir_with(t, "corpus.jsonl", lambda b: b + json.dumps({"_id": "blank", "title": " "}).encode()),
        ],
        ["corpus.jsonl line 42: document 'blank' has neither 'text' nor 'title'; fill one or drop the row"],
    ),
    (
        "qrels unknown document",
        lambda t, r, raw: [r, f"data={_beir(t, 'q1' + chr(9) + 'ghost' + chr(9) + '1' + chr(10))}"],
        ["train.tsv line", "document 'ghost' is not in corpus.jsonl"],
    ),
    (
        "qrels unknown query",
        lambda t, r, raw: [r, f"data={_beir(t, 'q999' + chr(9) + 'doc1' + chr(9) + '1' + chr(10))}"],
        ["train.tsv line", "query 'q999' is not in queries.jsonl"],
    ),
    (
        "empty split after filtering",
        lambda t, r, raw: [r, "data.max_queries=1"],
        ["split is empty; change splits.test_fraction or add queries"],
    ),
    (
        "test fraction out of range",
        lambda t, r, raw: [r, "splits.test_fraction=1.5"],
        ["splits.test_fraction: Input should be less than 1", "1.5"],
    ),
    (
        "fractions leave no training",
        lambda t, r, raw: [r, "splits.test_fraction=0.6", "splits.val_fraction=0.5"],
        ["must be < 1 to leave training queries"],
    ),
    (
        "splits file of other data",
        lambda t, r, raw: [
            r,
            f"splits.file={_file(t, 's.json', json.dumps({'train': ['x'], 'val': [], 'test': ['y']}))}",
        ],
        ["s.json: train query 'x' is not in the data"],
    ),
    (
        "unknown model",
        lambda t, r, raw: [r, "model.name=nobody/no-such-model"],
        ["model.name nobody/no-such-model: model not found"],
    ),
    (
        "model folder without a model",
        lambda t, r, raw: [r, f"model.name={t}"],
        ["folder has no config.json or modules.json"],
    ),
    (
        "adapter weights of the wrong shape",
        lambda t, r, raw: _wrong_shape_checkpoint(t, r),
        ["adapter weights do not fit", "resume with the recipe that made them"],
    ),
    ("damaged checkpoint", lambda t, r, raw: _truncated_checkpoint(t, r), ["state.pt: cannot read the checkpoint"]),
    (
        "resume a folder that is no run",
        lambda t, r, raw: [r, "--resume", str(t / "nothing-here")],
        ["not a run directory (no recipe.yaml)"],
    ),
    (
        "existing run directory",
        lambda t, r, raw: [r, "--run-dir", str(t)],
        ["already exists; pass --overwrite to replace it"],
    ),
    (
        "unsloth without CUDA",
        lambda t, r, raw: [_qlora(t, raw, backend="unsloth")],
        ["backend 'unsloth' needs a CUDA GPU"],
    ),
    (
        "4-bit full fine-tuning",
        lambda t, r, raw: [_qlora(t, raw, method="full")],
        ["method 'full' trains unquantised weights; set quantization=none"],
    ),
    ("cuda on a CPU machine", lambda t, r, raw: [r, "device=cuda"], ["device 'cuda' is not available"]),
    (
        "given negatives without a column",
        lambda t, r, raw: [r, "negatives.strategy=given"],
        ["negatives.strategy: strategy 'given' needs a negative column"],
    ),
    (
        "negatives file missing",
        lambda t, r, raw: [r, "negatives.pool=file", f"negatives.file={t / 'none.txt'}"],
        ["negatives.file", "none.txt: file not found"],
    ),
    (
        "API model without a URL",
        lambda t, r, raw: [r, "model.provider=openai_compatible"],
        ["model: provider 'openai_compatible' needs base_url"],
    ),
    (
        "checkpoint modules that do not load",
        lambda t, r, raw: [r, f"model.name={_broken_checkpoint(t, raw)}"],
        ["broken-model: cannot load the checkpoint's modules", "check its modules.json"],
    ),
    (
        "prompt name the checkpoint lacks",
        lambda t, r, raw: [r, "model.query_prompt_name=instruct"],
        ["model.query_prompt_name: prompt name 'instruct' is not one of the checkpoint's prompts"],
    ),
    (
        "prompt text and name together",
        lambda t, r, raw: [r, "model.query_prompt=find", "model.query_prompt_name=query"],
        ["set query_prompt (a text) or query_prompt_name (a saved prompt's name), not both"],
    ),
    (
        "LoRA targets that match nothing",
        lambda t, r, raw: [_qlora(t, raw, lora={"target_modules": ["q_proj"]})],
        ["lora.target_modules: ['q_proj'] match no linear layer", "named dense, key, query, value"],
    ),
    (
        "masked pooling without an attention mask",
        lambda t, r, raw: [_maskless_tokenizer(t, raw)],
        ["pooling 'mean' needs the tokenizer's attention_mask", "use pooling=cls"],
    ),
    (
        "bad override syntax",
        lambda t, r, raw: [r, "train..lr=1"],
        ["override 'train..lr=1' must look like key.sub=value"],
    ),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(world, build, expected, capsys, monkeypatch):
    tmp_path, recipe, raw = world
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = build(tmp_path, recipe, raw)
    runs = tmp_path / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = _error_line(capsys.readouterr().err)
    for fragment in expected:
        assert fragment in err, err
    assert (set(runs.iterdir()) if runs.exists() else set()) == before  # no new run directory


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(world, capsys, monkeypatch):
    import finetune.adapter.train as loop

    tmp_path, recipe, _ = world
    real, calls = loop.infonce_loss, []

    def diverging(*args, **kwargs):  # two good epochs (6 steps each), then the loss turns NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 12 else loss

    monkeypatch.setattr(loop, "infonce_loss", diverging)
    code = main(["run", recipe, "--run-dir", str(tmp_path / "nan")])
    err = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "training: loss is nan" in err and "training stopped and the last good checkpoint is kept in" in err
    state = torch.load(tmp_path / "nan" / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["adapter"].values())
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_qlora_nan_loss_stops_and_names_the_kept_checkpoint(world, capsys):
    tmp_path, _, raw = world
    recipe = _qlora(
        tmp_path,
        raw,
        quantization="none",
        train={
            "epochs": 100,
            "max_steps": 40,
            "batch_size": 8,
            "eval_steps": 2,
            "warmup_ratio": 0.5,
            "lr": 1e36,
            "scheduler": "linear",
        },
    )
    assert main(["run", recipe, "--run-dir", str(tmp_path / "qnan")]) == 2
    err = _error_line(capsys.readouterr().err)
    assert (
        "training: loss is nan at step" in err
        and "the last good checkpoint is kept in" in err
        and "checkpoint-" in err
    )
    assert not (tmp_path / "qnan" / "metrics.json").exists()
