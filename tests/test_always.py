"""Fields that a kind's ``rules.ALWAYS`` says always act: changing each one changes what the run does.

``ALWAYS`` is the escape from the no-inert-setting rule, so an entry there must be earned. Each entry
below has a witness: a value other than the default and an observable (the training loop's weights,
the trainer's arguments, the built encoder) that must differ from the default's. ``UNWITNESSED``
lists the entries no witness covers yet; a new ``ALWAYS`` entry must join one or the other.
"""

import pytest
import torch
from conftest import COLUMNS_PAIRS

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
WITNESSED = set(ADAPTER_TRAIN) | set(QLORA_TRAIN) | {"train.gradient_checkpointing"}
UNWITNESSED = {  # the rest of ALWAYS (issue 38): data, splits, model, loss, mode and output fields
    "kind", "name", "seed", "device", "output.dir", "data.type", "data.max_queries", "eval.also", "merge.scale",
    "splits.file", "data.columns.query", "data.columns.positive", "data.columns.id", "data.columns.domain",
    "negatives.strategy", "cache.enabled", "adapter.type", "loss.type", "loss.cached", "loss.matryoshka_dims",
    "projection.type", "projection.input", "mode", "train_ratios", "domains.leave_one_domain_out",
    "domains.per_domain", "method", "quantization", "pooling", "model.max_seq_length", "model.trust_remote_code",
    *(f"{s}.{f}" for s in ("model", "query_model", "document_model") for f in (
        "name", "provider", "query_prompt", "document_prompt", "query_prompt_name", "document_prompt_name",
        "batch_size")),
}  # fmt: skip


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
    import json

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
