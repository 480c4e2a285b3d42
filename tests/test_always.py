"""Fields that a kind's ``rules.ALWAYS`` says always act: changing each one changes what the run does.

``ALWAYS`` is the escape from the no-inert-setting rule, so an entry there must be earned. Each entry
has a witness: a value other than the default and an observable that must differ from the default's.
The training fields are seen in the trained weights or the trainer's arguments; ``SETUP`` fields in
what set-up loads and encodes (the data, the splits, what reaches the encoder, the cache, the
negatives); ``TRAINING`` fields in what a tiny run reports; ``BY_TEST`` names the test elsewhere that
changes a field and sees its effect. A new ``ALWAYS`` entry must join one of them (or ``UNWITNESSED``).
"""

import json

import pytest
import torch
from conftest import COLUMNS_PAIRS, make_pairs

from finetune.kinds import KINDS

ALWAYS = frozenset().union(*(kind.always_fields() for kind in KINDS.values()))

ADAPTER_TRAIN = {  # adapter and cross_adapter share the loop (finetune.adapter.train.train_adapter)
    "train.epochs": 4,
    "train.batch_size": 4,
    "train.lr": 3e-2,
    "train.weight_decay": 0.5,
    "train.warmup_ratio": 0.5,
    "train.grad_clip": 1e-3,
    "train.save_every": 2,
}
QLORA_TRAIN = {  # read into SentenceTransformerTrainingArguments
    "train.epochs": 2,
    "train.max_steps": 3,
    "train.batch_size": 4,
    "train.lr": 1e-3,
    "train.weight_decay": 0.0,
    "train.warmup_ratio": 0.3,
    "train.scheduler": "linear",
    "train.optimizer": "adamw_8bit",  # auto is adamw_torch on a CPU
    "train.precision": "bf16",
    "train.eval_steps": 7,
    "train.save_total_limit": 5,
    "train.logging_steps": 3,
    "train.max_grad_norm": 0.5,
}
MODEL_FIELDS = {  # a model section's fields, seen in what set-up loads and encodes
    "name": None,  # replaced by the other tiny model's folder
    "query_prompt": "look for",
    "document_prompt": "passage text",
    "query_prompt_name": "search",
    "document_prompt_name": "search",
    "batch_size": 3,
    "max_seq_length": 16,
    "trust_remote_code": True,
}
SETUP = {  # field -> its value; seen in the data, splits, encoder calls, embeddings or cache of set-up
    "adapter": {
        "data.type": "beir",  # a pairs file read as a BEIR folder: refused
        "data.max_queries": 20,
        "data.columns.query": "category",
        "data.columns.positive": "category",
        "data.columns.id": None,
        "data.columns.domain": None,
        "seed": 7,
        "splits.file": "SPLITS",  # a splits file saved with another seed
        "cache.enabled": False,
        "negatives.strategy": "none",
        **{f"model.{f}": v for f, v in MODEL_FIELDS.items()},
    },
    "cross_adapter": {
        **{f"{s}.{f}": v for s in ("query_model", "document_model") for f, v in MODEL_FIELDS.items()}
        | {"document_model.provider": "openai_compatible"},  # the fake OpenAI-compatible server's embeddings
    },
    "reranker": {f"retriever.{f}": v for f, v in MODEL_FIELDS.items()},  # the retriever loads and encodes in set-up
}
SETUP["cross_adapter"] = {f: v for f, v in SETUP["cross_adapter"].items() if f in ALWAYS}  # the rest have rules
TRAINING = {  # field -> value; seen in the trained adapter or projection of a tiny run (set up, train, finish)
    "adapter": {"adapter.type": "mlp", "loss.type": "triplet"},
    "cross_adapter": {"projection.type": "mlp"},
}
BY_TEST = {  # field -> the test that changes it and sees the run change (what it sees)
    "kind": "test_architecture.py::test_a_toy_kind_runs_end_to_end_through_the_cli",  # kind: toy runs the toy runner
    "name": "test_cli.py::test_two_recipes_share_one_splits_file",  # name=second names the run directory
    "device": "test_bad_input.py::test_bad_input_is_one_line_and_leaves_nothing",  # device=cuda here: refused
    "output.dir": "test_cli.py::test_run_writes_a_complete_run_directory_and_reuses_the_cache",  # runs land there
    "eval.also": "test_extra_sets.py::test_adapter_scores_the_extra_set_base_and_tuned",  # the extra set is scored
    "merge.scale": "test_extra_sets.py::test_adapter_merge_scale_zero_is_the_base_model",  # s = 0: tuned == base
    "loss.cached": "test_memory.py::test_cached_loss_equals_the_plain_loss",  # CachedMultipleNegativesRankingLoss
    "loss.matryoshka_dims": "test_memory.py::test_adapter_matryoshka_trains_the_nested_loss_and_reports_each_size",
    "projection.input": "test_cross_adapter.py::test_era_form_exports_plain_sentence_transformers_modules",  # large
    "mode": "test_cross_adapter.py::test_era_form_exports_plain_sentence_transformers_modules",  # label_only again
    "train_ratios": "test_cross_adapter.py::test_alignment_fits_no_label_and_the_small_model_is_always_a_candidate",
    "domains.leave_one_domain_out": (
        "test_cross_adapter.py::test_run_writes_summary_meta_projection_and_a_router_model_matching_the_toolkit"
    ),  # one lodo row per domain
    "domains.per_domain": (
        "test_cross_adapter.py::test_alignment_fits_no_label_and_the_small_model_is_always_a_candidate"
    ),
    "method": "test_memory.py::test_planned_weight_and_lora_bytes_equal_the_built_models",  # full: no LoRA tensors
    "quantization": "test_qlora.py::test_quantized_encoder_holds_4bit_layers_and_only_lora_trains",
    "pooling": "test_checkpoint_stack.py::test_explicit_pooling_overrides_and_is_reported",  # mean over cls
    "model.provider": "test_api_embedder.py::test_adapter_trains_over_api_embeddings_batched_retried_and_cached_without_leaking_the_key",  # noqa: E501
    "query_model.provider": "test_cross_adapter.py::test_api_query_encoder_trains_saves_the_projection_and_no_model",
    "retriever.provider": "test_reranker.py::test_bad_reranker_recipes_are_one_line_and_write_nothing",  # refused
    "rerank.k": "test_reranker.py::test_a_fixed_k_reranks_and_the_base_row_is_the_retriever_alone",  # k = 10 reranks
    "negatives.per_query": "test_reranker.py::test_a_bert_reranker_run_writes_both_stages_and_chooses_k_on_validation",
    "teacher": "test_teacher.py::test_a_taught_qlora_run_records_its_teacher",  # the teacher's loss and record
}
WITNESSED = (
    set(ADAPTER_TRAIN)
    | set(QLORA_TRAIN)
    | {"train.gradient_checkpointing"}
    | {f for fields in (*SETUP.values(), *TRAINING.values()) for f in fields}
    | set(BY_TEST)
)
UNWITNESSED = set()  # a new ALWAYS entry with no witness yet goes here, and into an issue


def test_every_always_entry_has_a_witness_or_is_listed_as_unwitnessed():
    assert WITNESSED | UNWITNESSED == ALWAYS and not WITNESSED & UNWITNESSED


def _adapter_outcome(config, monkeypatch) -> tuple[torch.Tensor, int]:
    """The trained adapter's weights and the number of checkpoint writes, on fixed synthetic embeddings."""
    from finetune.adapter import train as loop
    from finetune.adapter.config import LossConfig
    from finetune.adapter.modules import build_adapter
    from finetune.adapter.negatives import NegativeSampler, relevance_keys

    writes = []
    monkeypatch.setattr(loop, "save_training_state", lambda path, state: writes.append(state["epoch"]))
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(24, 8, generator=gen), dim=-1)
    docs = torch.nn.functional.normalize(queries + torch.randn(24, 8, generator=gen), dim=-1)
    pairs = torch.stack([torch.arange(24), torch.arange(24)], dim=1)
    adapter = build_adapter("linear", 8)
    sampler = NegativeSampler(docs, relevance_keys(pairs, 24), per_query=0)
    loop.train_adapter(adapter, queries, docs, pairs, sampler, LossConfig(), config, 0, checkpoint=object())
    return adapter.delta.weight.detach().clone(), len(writes)


@pytest.mark.parametrize("path, value", sorted(ADAPTER_TRAIN.items()))
def test_adapter_training_fields_change_the_trained_adapter(path, value, monkeypatch):
    from finetune.adapter.config import AdapterTrainConfig

    base = AdapterTrainConfig(epochs=3, batch_size=8, lr=1e-2, patience=None)
    changed = base.model_copy(update={path.split(".")[1]: value})
    (w0, n0), (w1, n1) = (_adapter_outcome(c, monkeypatch) for c in (base, changed))
    assert n0 != n1 if path == "train.save_every" else not torch.equal(w0, w1)


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    """A QLoRA runner on the tiny model (built once): its trainer arguments are read per setting."""
    from conftest import make_pairs

    from finetune.data import load_data
    from finetune.qlora.runner import QLoRARun
    from finetune.recipe import validate_recipe
    from finetune.splits import make_splits

    pairs = tmp_path_factory.mktemp("always") / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    recipe = validate_recipe(
        {"kind": "qlora", "model": {"name": str(tiny_model)}, "data": {"path": str(pairs), "columns": COLUMNS_PAIRS}}
    )
    data = load_data(recipe.data)
    return QLoRARun(recipe, data, make_splits(data, recipe.splits, recipe.seed), "cpu")


def _arguments(run, tmp_path) -> dict:
    from finetune.qlora.train import arguments

    args = arguments(run.recipe, "cpu", tmp_path, "eval_val_cosine_ndcg@10", None, 40).to_dict()
    return {k: v for k, v in args.items() if k not in ("output_dir", "logging_dir")}


@pytest.mark.parametrize("path, value", sorted(QLORA_TRAIN.items()))
def test_qlora_training_fields_change_the_trainer_arguments(path, value, qlora_run, tmp_path):
    field = path.split(".")[1]
    default = getattr(qlora_run.recipe.train, field)
    before = _arguments(qlora_run, tmp_path)
    setattr(qlora_run.recipe.train, field, value)
    try:
        after = _arguments(qlora_run, tmp_path)
    finally:
        setattr(qlora_run.recipe.train, field, default)
    assert after != before


def test_gradient_checkpointing_changes_the_built_encoder(qlora_run):
    from finetune.qlora.backend import build_encoder

    recipe = qlora_run.recipe.model_copy(deep=True)
    recipe.quantization = "none"
    on = recipe.model_copy(deep=True)
    on.train.gradient_checkpointing = True
    built = [build_encoder(r, qlora_run.choice)[0][0].auto_model for r in (recipe, on)]
    assert [m.is_activation_checkpointing for m in built] == [False, True]


def test_every_witnessing_test_exists():
    """``BY_TEST`` names real tests, so a renamed or deleted witness is seen here."""
    import ast
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for field, node in BY_TEST.items():
        file, name = node.split("::")
        defined = {f.name for f in ast.parse((here / file).read_text()).body if isinstance(f, ast.FunctionDef)}
        assert name in defined, f"{field}: {node} is not a test"


def _with_prompts(folder, out):
    """``folder``'s model saved with named prompts, so the ``*_prompt_name`` fields have a prompt to pick."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: ", "search": "search: "}
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def prompted(tiny_model, tiny_model_wide, tmp_path_factory):
    """(small, large): the two tiny models with named prompts."""
    folder = tmp_path_factory.mktemp("prompted")
    return _with_prompts(tiny_model, folder / "small"), _with_prompts(tiny_model_wide, folder / "large")


def _base_raw(kind: str, prompted, pairs, tmp_path) -> dict:
    """The tiny recipe of ``kind`` (its embedding cache in ``$FINETUNE_CACHE``, so cache.enabled can be off)."""
    small, large = prompted
    common = {"data": {"path": str(pairs), "columns": COLUMNS_PAIRS}, "output": {"dir": str(tmp_path / "runs")}}
    if kind == "adapter":
        return {"kind": kind, "model": {"name": str(small)}, "train": {"epochs": 2}, **common}
    if kind == "reranker":
        return {"kind": kind, "model": str(small), "retriever": {"name": str(small)}, "rerank": {"k": 3}, **common}
    models = {"query_model": {"name": str(large)}, "document_model": {"name": str(small)}}
    return {"kind": kind, **models, "mode": "label_only", "train_ratios": [1.0], "train": {"epochs": 2}, **common}


def _overridden(raw: dict, path: str, value, other, tmp_path, fake_url: str) -> dict:
    """``raw`` with ``path`` set to ``value`` (the placeholders made real: ``name`` becomes ``other``)."""
    from finetune.recipe import apply_overrides

    if path.endswith(".name"):
        value = str(other)
    if path == "document_model.provider":
        api = {"provider": value, "name": "fake-embed", "base_url": fake_url, "dimensions": 32}
        return {**raw, "document_model": {**api, "api_key_env": "FAKE_EMBED_KEY"}}
    if path == "splits.file":
        from finetune.data import load_data
        from finetune.recipe import validate_recipe
        from finetune.splits import make_splits

        recipe = validate_recipe(raw)
        make_splits(load_data(recipe.data), recipe.splits, recipe.seed + 1).save(tmp_path / "other.json")
        value = str(tmp_path / "other.json")
    return apply_overrides(raw, [f"{path}={'null' if value is None else value}"])


def _set_up(raw: dict, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return _recorded_set_up(raw, tmp_path, monkeypatch)


def _recorded_set_up(raw: dict, tmp_path, monkeypatch):
    """What set-up did: the data, the splits, every encoder loaded (its ``trust_remote_code`` and
    ``max_seq_length``), every text it encoded (method, prompt, batch size, a digest of the output), the
    cache's files and the negatives found (or the one-line refusal); and the runner. What reaches the
    model is recorded, not what the cache was asked, so a setting lost on the way is seen."""
    import hashlib

    import sentence_transformers

    from finetune import run
    from finetune.errors import FinetuneError
    from finetune.recipe import validate_recipe

    loaded, encoded = [], []

    class Recorded(sentence_transformers.SentenceTransformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaded.append((kwargs.get("trust_remote_code"), self))

        def encode(self, *args, **kwargs):
            out = super().encode(*args, **kwargs)
            digest = hashlib.sha1(torch.as_tensor(out).cpu().numpy().tobytes()).hexdigest()
            encoded.append((kwargs.get("prompt"), kwargs.get("batch_size"), len(out), digest))
            return out

    with monkeypatch.context() as patch:
        patch.setattr(sentence_transformers, "SentenceTransformer", Recorded)
        try:
            recipe = validate_recipe(raw)
            data, splits = run._data_and_splits(recipe, tmp_path, resuming=False, selection=False)
            job = run._set_up(recipe, data, splits, "cpu", False, run.RunOptions(), lambda *_: None)
        except FinetuneError as exc:
            return {"refused": str(exc)}, None
    seen = {
        "data": (data.queries, data.corpus, data.relevant, data.domains),
        "splits": (splits.train, splits.val, splits.test),
        "loaded": [(trust, model.max_seq_length) for trust, model in loaded],
        "encoded": encoded,
        "cache_files": sum(p.is_file() for p in (tmp_path / "cache").rglob("*")),
        "negatives": getattr(job, "negatives_stats", None),
    }
    return seen, job


SETUP_CASES = [(kind, path, value) for kind, fields in SETUP.items() for path, value in fields.items()]


@pytest.fixture(scope="module")
def defaults(prompted, tmp_path_factory):
    """Per kind, what set-up does with the default recipe (computed once; the pairs file is fixed)."""
    pairs = tmp_path_factory.mktemp("always-data") / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    seen = {}

    def default(kind: str) -> tuple[dict, dict]:
        if kind not in seen:
            tmp = tmp_path_factory.mktemp(f"default-{kind}")
            raw = _base_raw(kind, prompted, pairs, tmp)
            with pytest.MonkeyPatch.context() as patch:
                seen[kind] = raw, _set_up(raw, tmp / "before", patch)[0]
        return seen[kind]

    return default


@pytest.mark.parametrize("kind, path, value", SETUP_CASES, ids=[f"{k}:{p}" for k, p, _ in SETUP_CASES])
def test_set_up_fields_change_what_set_up_loads_and_encodes(
    kind, path, value, defaults, tiny_model, tiny_model_wide, tmp_path, monkeypatch
):
    from fake_openai import FakeOpenAI

    monkeypatch.setenv("FAKE_EMBED_KEY", "sk-test")
    raw, before = defaults(kind)
    other = tiny_model_wide if path.startswith("model.") else tiny_model if "document" in path else tiny_model_wide
    with FakeOpenAI() as fake:
        changed = _overridden(raw, path, value, other, tmp_path, fake.base_url)
        after, _ = _set_up(changed, tmp_path / "after", monkeypatch)
    assert "refused" not in before and "refused" not in after or path == "data.type", after
    assert after != before


def _trained(kind: str, raw: dict, tmp_path, monkeypatch) -> dict:
    """What a tiny run reports (its losses, scores and parameter counts; not its timings)."""
    from finetune.contract import Start

    _, job = _set_up(raw, tmp_path, monkeypatch)
    job.train(tmp_path, Start.fresh())
    return {k: v for k, v in job.finish(tmp_path).metrics().items() if k != "seconds"}


TRAINING_CASES = [(kind, path, value) for kind, fields in TRAINING.items() for path, value in fields.items()]


@pytest.mark.parametrize("kind, path, value", TRAINING_CASES, ids=[f"{k}:{p}" for k, p, _ in TRAINING_CASES])
def test_training_fields_change_the_trained_model(kind, path, value, prompted, pairs_file, tmp_path, monkeypatch):
    from finetune.recipe import apply_overrides

    raw = _base_raw(kind, prompted, pairs_file, tmp_path)
    changed = apply_overrides(raw, [f"{path}={value}"])
    before = _trained(kind, raw, tmp_path / "before", monkeypatch)
    after = _trained(kind, changed, tmp_path / "after", monkeypatch)
    assert after != before
