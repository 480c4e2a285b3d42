"""No setting is silently ignored: a field set to a value the resolved recipe would not use is an error.

Many fields only matter under some value of another field: ``negatives.range_min`` only for mined
or BM25 negatives, ``data.path`` not for builtin data, ``lora.*`` not for full fine-tuning. A user
who sets one of them expects an effect; a run that ignores it prints numbers for a recipe they did
not write. :func:`check_fields` refuses a recipe in which such a field holds anything but its
default, naming the field, when it applies, and the fix.

Every field of every recipe kind is either in :data:`RULES` (when it applies) or in
:data:`ALWAYS` (it always has an effect); ``tests/test_field_rules.py`` enumerates the schema, so
a new field cannot skip the rule, and each rule carries a witness that the test runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from finetune.errors import FinetuneError

MODEL_SECTIONS = ("model", "query_model", "document_model")


@dataclass(frozen=True)
class Rule:
    """``path`` has an effect only when ``applies(recipe)``; ``when`` says so in words.

    ``witness`` is a list of overrides under which the field is set but has no effect (the test
    runs it and expects this rule's error); ``fix`` is the advice after "remove it".
    """

    path: str
    applies: Callable[[BaseModel], bool]
    when: str
    witness: tuple[str, ...]
    fix: str = ""
    kinds: tuple[str, ...] = ("adapter", "qlora", "cross_adapter")


def _neg(*strategies: str) -> Callable[[BaseModel], bool]:
    return lambda r: r.negatives.strategy in strategies


def _lora(r) -> bool:
    return r.method == "lora"


def _aligns(r) -> bool:
    return bool(set(r.modes()) & {"alignment_only", "both"})


def _validates(r) -> bool:
    """The run will have validation queries: a fraction, a splits file, or a BEIR folder's own dev split."""
    return r.splits.val_fraction > 0 or bool(r.splits.file) or (r.data.type == "beir" and r.splits.use_predefined)


VALIDATES = "the run has validation queries (splits.val_fraction above 0, a splits.file, or a BEIR dev split)"


def _model_rules(section: str, kinds: tuple[str, ...]) -> list[Rule]:
    api, local = "provider is openai_compatible", "provider is local"

    def remote(r):
        return getattr(r, section).provider == "openai_compatible"

    rules = [
        Rule(f"{section}.{f}", remote, f"{section}.{api}", (f"{section}.{f}={v}",), kinds=kinds)
        for f, v in (
            ("base_url", "http://127.0.0.1:9/v1"),
            ("dimensions", 64),
            ("api_key_env", "MY_KEY"),
            ("timeout", 5),
            ("max_retries", 1),
        )
    ]
    frozen = tuple(k for k in kinds if k != "qlora")  # frozen-encoder recipes accept an API model
    if frozen:
        rules += [
            Rule(
                f"{section}.{f}",
                lambda r: not remote(r),
                f"{section}.{local}",
                (
                    f"{section}.provider=openai_compatible",
                    f"{section}.base_url=http://127.0.0.1:9/v1",
                    f"{section}.{f}={v}",
                ),
                kinds=frozen,
            )
            for f, v in (("max_seq_length", 64), ("trust_remote_code", "true"), ("encode_devices", "[cpu]"))
        ]
    return rules


RULES: list[Rule] = [
    # data: what each source type reads
    Rule(
        "data.name",
        lambda r: r.data.type in ("builtin", "hf") and not (r.data.type == "hf" and r.data.path),
        "data.type is builtin, or hf without a path",
        ("data.type=pairs", "data.path=x.jsonl", "data.name=construction-faq"),
        "or pass data=NAME to read that data",
    ),
    Rule(
        "data.path",
        lambda r: r.data.type in ("pairs", "beir", "hf"),
        "data.type is pairs, beir or hf",
        ("data.type=builtin", "data.path=elsewhere.jsonl"),
        "or pass data=PATH to read that file or folder instead",
    ),
    Rule("data.split", lambda r: r.data.type == "hf", "data.type is hf", ("data.split=train",)),
    Rule(
        "data.columns",
        lambda r: r.data.type in ("pairs", "hf"),
        "data.type is pairs or hf (builtin and BEIR data have fixed fields)",
        ("data.columns.query=question",),
    ),
    Rule(
        "data.columns.negative",
        lambda r: r.negatives.strategy == "given",
        "negatives.strategy is given",
        (
            "data.type=pairs",
            "data.name=null",
            "data.path=x.jsonl",
            "data.columns.negative=neg",
            "negatives.strategy=random",
        ),
        "or set negatives.strategy=given",
    ),
    # splits: a splits file replaces the fractions
    *(
        Rule(
            f"splits.{f}",
            lambda r: not r.splits.file,
            "splits.file is not set (a splits file fixes the split)",
            ("splits.file=s.json", f"splits.{f}={v}"),
        )
        for f, v in (
            ("test_fraction", 0.3),
            ("val_fraction", 0.2),
            ("group_by_domain", "true"),
            ("use_predefined", "false"),
        )
    ),
    Rule(
        "splits.use_predefined",
        lambda r: r.data.type == "beir",
        "data.type is beir (only BEIR folders carry predefined splits)",
        ("splits.use_predefined=false",),
    ),
    Rule(
        "splits.group_by_domain",
        lambda r: r.data.type == "builtin" or bool(r.data.columns.domain),
        "the data has domains (builtin, or data.columns.domain set)",
        ("data.type=pairs", "data.name=null", "data.path=x.jsonl", "splits.group_by_domain=true"),
        "or set data.columns.domain",
    ),
    # negatives: each strategy reads its own fields
    Rule(
        "negatives.per_query",
        lambda r: r.negatives.strategy != "none",
        "negatives.strategy is not none",
        ("negatives.strategy=none", "negatives.per_query=3"),
    ),
    Rule(
        "negatives.pool",
        lambda r: r.kind == "adapter" and r.negatives.strategy == "random",
        "negatives.strategy is random in an adapter recipe (qlora and cross_adapter draw negatives from the corpus)",
        ("negatives.strategy=mined", "negatives.pool=file", "negatives.file=n.txt"),
    ),
    Rule(
        "negatives.file",
        lambda r: r.kind == "adapter" and r.negatives.strategy == "random" and r.negatives.pool == "file",
        "negatives.strategy is random and negatives.pool is file, in an adapter recipe",
        ("negatives.strategy=random", "negatives.file=n.txt"),
        "or set negatives.pool=file",
    ),
    *(
        Rule(
            f"negatives.{f}",
            _neg("mined", "bm25"),
            "negatives.strategy is mined or bm25",
            ("negatives.strategy=random", f"negatives.{f}={v}"),
        )
        for f, v in (("range_min", 2), ("range_max", 30), ("sampling", "random"))
    ),
    *(
        Rule(
            f"negatives.{f}",
            _neg("mined"),
            "negatives.strategy is mined (dense scores)",
            ("negatives.strategy=bm25", f"negatives.{f}={v}"),
        )
        for f, v in (("relative_margin", 0.1), ("max_score", 0.9))
    ),
    # cache
    Rule(
        "cache.dir",
        lambda r: r.cache.enabled,
        "cache.enabled is true",
        ("cache.enabled=false", "cache.dir=/tmp/elsewhere"),
        kinds=("adapter", "cross_adapter"),
    ),
    # adapter and cross_adapter layers and losses
    *(
        Rule(
            f"adapter.{f}",
            lambda r: r.adapter.type == "mlp",
            "adapter.type is mlp",
            ("adapter.type=linear", f"adapter.{f}={v}"),
            kinds=("adapter",),
        )
        for f, v in (("hidden_dim", 64), ("dropout", 0.1))
    ),
    Rule(
        "projection.hidden_dim",
        lambda r: r.projection.type == "mlp",
        "projection.type is mlp",
        ("projection.type=linear", "projection.hidden_dim=64"),
        kinds=("cross_adapter",),
    ),
    Rule(
        "loss.margin",
        lambda r: r.loss.type == "triplet",
        "loss.type is triplet",
        ("loss.type=mnrl", "loss.margin=0.5"),
        kinds=("adapter", "cross_adapter"),
    ),
    Rule(
        "loss.temperature",
        lambda r: r.loss.type == "mnrl",
        "loss.type is mnrl",
        ("loss.type=triplet", "loss.temperature=0.1"),
        kinds=("adapter", "cross_adapter"),
    ),
    Rule(
        "loss.mini_batch_size",
        lambda r: r.loss.cached,
        "loss.cached is true (the plain loss takes the whole batch at once)",
        ("loss.mini_batch_size=8",),
        "or set loss.cached=true",
        kinds=("qlora",),
    ),
    Rule(
        "loss.matryoshka_dims",
        lambda r: r.loss.type == "mnrl",
        "loss.type is mnrl (the nested loss truncates and renormalises the InfoNCE embeddings)",
        ("loss.type=triplet", "negatives.strategy=random", "loss.matryoshka_dims=[8]"),
        kinds=("adapter",),
    ),
    Rule(
        "loss.matryoshka_dims",
        lambda r: False,
        "the recipe trains a projection into a fixed document index (cross_adapter has no nested loss)",
        ("loss.matryoshka_dims=[8]",),
        "and train Matryoshka with kind: adapter or qlora",
        kinds=("cross_adapter",),
    ),
    *(
        Rule(
            f"alignment.{f}",
            _aligns,
            "mode includes alignment_only or both",
            ("mode=label_only", f"alignment.{f}={v}"),
            kinds=("cross_adapter",),
        )
        for f, v in (("objective", "identical_text"), ("use_queries", "false"), ("texts", "more.txt"))
    ),
    *(
        Rule(
            f"merge.{f}",
            lambda r: r.merge.scale == "auto",
            "merge.scale is auto",
            (f"merge.{f}={v}",) if f == "grid" else ("eval.also=[x.jsonl]", f"merge.{f}={v}"),
            kinds=("adapter", "qlora"),
        )
        for f, v in (("grid", "[0,1]"), ("max_drop", 0.01))
    ),
    Rule(
        "projection.init",
        lambda r: "label_only" in r.modes(),
        "mode includes label_only",
        ("mode=both", "projection.init=runs/x/projection"),
        kinds=("cross_adapter",),
    ),
    Rule(
        "alignment.ridge",
        lambda r: _aligns(r) and "scores" in r.alignment.objectives(),
        "alignment.objective includes scores (and mode includes alignment_only or both)",
        ("alignment.objective=identical_text", "alignment.ridge=[0.5]"),
        kinds=("cross_adapter",),
    ),
    Rule(
        "alignment.mix",
        lambda r: _aligns(r) and r.projection.input == "both",
        "projection.input is both (and mode includes alignment_only or both)",
        ("projection.input=large", "alignment.mix=[0,1]"),
        kinds=("cross_adapter",),
    ),
    *(
        Rule(
            f"alignment.{f}",
            lambda r: _aligns(r) and "identical_text" in r.alignment.objectives(),
            "alignment.objective includes identical_text (and mode includes alignment_only or both)",
            ("alignment.objective=scores", f"alignment.{f}={v}"),
            kinds=("cross_adapter",),
        )
        for f, v in (("loss", "mse"), ("epochs", 3), ("batch_size", 16), ("lr", 0.01), ("weight_decay", 0.1))
    ),
    Rule(
        "domains.min_queries",
        lambda r: r.domains.leave_one_domain_out or r.domains.per_domain,
        "domains.leave_one_domain_out or domains.per_domain",
        ("domains.leave_one_domain_out=false", "domains.per_domain=false", "domains.min_queries=4"),
        kinds=("cross_adapter",),
    ),
    Rule(
        "domains.test_fraction",
        lambda r: r.domains.per_domain,
        "domains.per_domain is true",
        ("domains.per_domain=false", "domains.test_fraction=0.5"),
        kinds=("cross_adapter",),
    ),
    # settings that act through validation scores
    Rule(
        "train.patience",
        _validates,
        VALIDATES,
        ("splits.val_fraction=0", "train.patience=3"),
        "or set splits.val_fraction above 0",
        kinds=("adapter", "cross_adapter"),
    ),
    Rule(
        "train.load_best_model_at_end",
        _validates,
        VALIDATES,
        ("splits.val_fraction=0", "train.load_best_model_at_end=false"),
        "or set splits.val_fraction above 0",
        kinds=("qlora",),
    ),
    # qlora: LoRA settings are for method lora, quantisation settings for nf4
    Rule(
        "backend",
        _lora,
        "method is lora (full fine-tuning has one backend)",
        ("method=full", "quantization=none", "backend=peft"),
        kinds=("qlora",),
    ),
    Rule(
        "compute_dtype",
        _lora,
        "method is lora (full fine-tuning uses train.precision)",
        ("method=full", "quantization=none", "compute_dtype=float32"),
        kinds=("qlora",),
    ),
    Rule(
        "double_quant",
        lambda r: r.quantization == "nf4",
        "quantization is nf4",
        ("quantization=none", "double_quant=false"),
        kinds=("qlora",),
    ),
    *(
        Rule(
            f"lora.{f}",
            _lora,
            "method is lora",
            ("method=full", "quantization=none", f"lora.{f}={v}"),
            kinds=("qlora",),
        )
        for f, v in (
            ("r", 8),
            ("alpha", 8),
            ("dropout", 0.1),
            ("target_modules", "[query]"),
            ("use_rslora", "true"),
            ("bias", "all"),
            ("train_head", "true"),
        )
    ),
    *_model_rules("model", ("adapter", "qlora")),
    *_model_rules("query_model", ("cross_adapter",)),
    *_model_rules("document_model", ("cross_adapter",)),
    Rule(
        "model.encode_devices",
        lambda r: False,
        "the recipe encodes with a frozen model (adapter, cross_adapter); QLoRA trains the encoder",
        ("model.encode_devices=[cpu]",),
        kinds=("qlora",),
    ),
]

_ALWAYS_MODEL = (
    "name",
    "provider",
    "query_prompt",
    "document_prompt",
    "query_prompt_name",
    "document_prompt_name",
    "batch_size",
)
ALWAYS: set[str] = {
    "kind",
    "name",
    "seed",
    "device",
    "output.dir",
    "data.type",
    "data.max_queries",
    "eval.also",
    "merge.scale",
    "splits.file",
    "data.columns.query",
    "data.columns.positive",
    "data.columns.id",
    "data.columns.domain",
    "negatives.strategy",
    "cache.enabled",
    "adapter.type",
    "loss.type",
    "loss.cached",
    "loss.matryoshka_dims",  # qlora (adapter and cross_adapter: RULES)
    "projection.type",
    "projection.input",
    "mode",
    "train_ratios",
    "domains.leave_one_domain_out",
    "domains.per_domain",
    "method",
    "quantization",
    "pooling",
    *(
        f"train.{f}"
        for f in (
            "epochs",
            "batch_size",
            "lr",
            "weight_decay",
            "warmup_ratio",
            "grad_clip",
            "save_every",
            "max_steps",
            "scheduler",
            "optimizer",
            "precision",
            "gradient_checkpointing",
            "eval_steps",
            "save_total_limit",
            "logging_steps",
            "max_grad_norm",
        )
    ),
    *(f"{s}.{f}" for s in MODEL_SECTIONS for f in _ALWAYS_MODEL),
    "model.max_seq_length",
    "model.trust_remote_code",  # the qlora kind takes local models only
}


def _get(recipe: BaseModel, path: str):
    """``(value, default)`` of the field at ``path``; ``None`` when the recipe kind has no such field."""
    node, parts = recipe, path.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if not isinstance(node, BaseModel):
            return None
    field = type(node).model_fields.get(parts[-1])
    if field is None:
        return None
    default = field.default_factory() if field.default_factory is not None else field.default
    return getattr(node, parts[-1]), default


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def ineffective(recipe: BaseModel) -> list[tuple[Rule, object, object]]:
    """``(rule, value, default)`` for every field holding a non-default value this recipe would not use."""
    out = []
    for rule in RULES:
        if recipe.kind not in rule.kinds:
            continue
        got = _get(recipe, rule.path)
        if got is None or got[0] == got[1] or rule.applies(recipe):
            continue
        out.append((rule, *got))
    return out


def default_override(rule: Rule, default) -> str | None:
    """The ``path=default`` override that puts a field back to its default (``None`` for a whole section)."""
    return None if isinstance(default, BaseModel) else f"{rule.path}={_yaml(default)}"


def check_fields(recipe: BaseModel, where: str = "recipe") -> None:
    """Refuse ``recipe`` if a field holds a non-default value that this recipe would not use.

    Raises:
        FinetuneError: ``recipes/adapter.yaml: negatives.range_min=3 has no effect unless
            negatives.strategy is mined or bm25; remove it``.
    """
    for rule, got, default in ineffective(recipe)[:1]:
        value = got.model_dump(exclude_defaults=True) if isinstance(got, BaseModel) else got
        reset = default_override(rule, default)
        fix = f"; remove it{f' (on the command line: {reset}, its default)' if reset else ''}"
        fix += f", {rule.fix}" if rule.fix else ""
        raise FinetuneError(f"{rule.path}={value!r} has no effect unless {rule.when}{fix}", where=where)
