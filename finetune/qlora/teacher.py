"""A teacher for the encoder: its scores of each training row's positive and negatives, computed once and cached.

The teacher is a bi-encoder (cosine of its own query and document embeddings, with its own prompts) or a
cross-encoder (its raw logit for the pair). Only scores pass from teacher to student, so the teacher's
tokenizer, embedding size and architecture need not match the student's. The scores are cached beside the
embedding cache (``$FINETUNE_CACHE/../teacher_scores``), keyed by the teacher's files, its settings and
every (query, document) text, so a second run with the same teacher and negatives scores nothing.

``teacher.loss: in_batch_kl`` scores every query of a batch against every document of the batch, which only
a bi-encoder can do without a forward pass per pair: the cache then holds the teacher's embeddings of the
training queries and documents, and each row's label is its indices into them (query, positive, negatives).

Example (not run: it needs a model, data or a server)::
    scores, record = teacher_labels(recipe, data, splits.train, negatives, "cpu")
    scores.shape  # (rows, 1 + negatives.per_query): positive first
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.atomic import save_tensors
from finetune.cache import default_cache_dir
from finetune.errors import FinetuneError
from finetune.memory.lengths import SAMPLE
from finetune.models import model_identity, resolve_model, saved_model_type, saved_setting
from finetune.stages import stage

BI_ENCODER_TEMPERATURE = 0.05  # cosine scores: MNRL's scale 20, the student's own temperature


@dataclass(frozen=True)
class Teacher:
    """A teacher checkpoint: ``kind`` is ``bi-encoder`` or ``cross-encoder``; a bi-encoder's ``similarity`` is the
    ``similarity_fn_name`` it saved (sentence-transformers' cosine when it saved none)."""

    kind: str
    path: Path
    similarity: str | None = None


def find_teacher(config) -> Teacher:
    """The teacher's folder (a run directory's ``model/``, or what :func:`resolve_model` finds) and its kind."""
    name, where = config.model.name, f"teacher.model {config.model.name}"
    run = Path(name)
    if (run / "recipe.yaml").is_file() and not (run / "metrics.json").is_file():
        raise FinetuneError(
            "this run directory has not finished (no metrics.json); wait for it, or resume it", where=where
        )
    path = run / "model" if (run / "metrics.json").is_file() and (run / "model").is_dir() else None
    path = path or resolve_model(name, field="teacher.model.name").path
    model_type = saved_model_type(path)
    if model_type == "CrossEncoder" or (model_type is None and not (path / "modules.json").is_file()):
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=config.model.trust_remote_code
        )
        architecture = (hf.architectures or [""])[0]
        if architecture.endswith("ForSequenceClassification") and hf.num_labels != 1:
            raise FinetuneError(
                f"the teacher is a classifier with {hf.num_labels} labels, and a teacher gives one score per "
                "(query, document) pair; use a one-label cross-encoder (a reranker run) or a bi-encoder",
                where=where,
            )
        if model_type == "CrossEncoder" or architecture.endswith("ForSequenceClassification"):
            return Teacher("cross-encoder", path)
    return Teacher("bi-encoder", path, saved_setting(path, "similarity_fn_name") or "cosine")


def check_teacher(config) -> Teacher | None:
    """The teacher (None without one), found and fit for its loss: a run calls this before any encoding, so a
    teacher it cannot use is refused in one line before the work, not after it."""
    if config is None:
        return None
    teacher = find_teacher(config)
    if config.loss == "in_batch_kl" and teacher.kind != "bi-encoder":
        raise FinetuneError(
            "in_batch_kl scores every query of a batch against every document of it, which needs a bi-encoder's "
            "embeddings, and this teacher is a cross-encoder; use teacher.loss=kl_div or margin_mse",
            where="teacher.loss",
        )
    if config.loss == "in_batch_kl" and teacher.similarity not in ("cosine", "dot"):
        raise FinetuneError(
            f"in_batch_kl takes a teacher that scores by cosine or dot product, and this one scores by "
            f"{teacher.similarity}; use teacher.loss=kl_div",
            where="teacher.loss",
        )
    return teacher


def longest_batch(teacher: Teacher, max_length: int, data=None) -> int:
    """Tokens of the longest batch the teacher encodes, by its own tokenizer: the longest query or document of
    ``data`` (a query and a document together for a cross-encoder), cut at ``max_length``; without ``data``,
    ``max_length``. Every query and document counts, a bound on the training rows' (not yet mined)."""
    if data is None:
        return max_length
    import heapq

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path), local_files_only=True)

    def longest(texts) -> int:  # the longest texts by characters, as longest_tokens does for the student
        texts = heapq.nlargest(SAMPLE, texts, key=len)
        return max(
            (len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]), default=0
        )

    query, document = longest(data.queries.values()), longest(data.corpus.values())
    return min(max_length, query + document if teacher.kind == "cross-encoder" else max(query, document))


def temperature_of(config, teacher: Teacher) -> float:
    """``teacher.temperature``, ``auto`` resolved by the teacher's kind."""
    if config.temperature != "auto":
        return config.temperature
    return BI_ENCODER_TEMPERATURE if teacher.kind == "bi-encoder" else 1.0


def training_rows(data, train_ids: list[str], negatives) -> list[tuple[str, list[str]]]:
    """(query id, [positive, negative_1, ...]) in the order of the training dataset's rows."""
    return [(q, [d, *negatives.by_query[q]]) for q in train_ids for d in sorted(data.relevant[q])]


@dataclass
class Distillation:
    """What training needs of the teacher: its section, resolved temperature, the labels and the record."""

    config: object
    temperature: float | None
    labels: torch.Tensor
    record: dict
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # in_batch_kl: (queries, documents), normalised


def prepare_teacher(
    recipe, data, train_ids: list[str], negatives, device: str, echo=print, teacher: Teacher | None = None
) -> Distillation | None:
    """The recipe's teacher scored on the training rows (None without a ``teacher``), and one line saying so;
    ``teacher`` is what :func:`check_teacher` found, else it is found again."""
    if recipe.teacher is None:
        return None
    if recipe.teacher.loss == "in_batch_kl":
        labels, embeddings, record = teacher_embeddings(recipe, data, train_ids, negatives, device, teacher)
        what = f"embeddings of {len(embeddings[0]):,} queries and {len(embeddings[1]):,} documents"
    else:
        (labels, record), embeddings = teacher_labels(recipe, data, train_ids, negatives, device, teacher), None
        what = f"scores of {record['rows']:,} rows x {labels.shape[1]} documents"
    cached = "from the cache" if record["cache"]["hit"] else "computed now and cached"
    echo(
        f"teacher: {record['model']} ({record['kind']}); {what} {cached}; "
        f"mean margin positive - negative {record['mean_margin']:+.4f}"
    )
    return Distillation(recipe.teacher, record["temperature"], labels, record, embeddings)


def teacher_labels(
    recipe, data, train_ids: list[str], negatives, device: str, teacher: Teacher | None = None
) -> tuple[torch.Tensor, dict]:
    """The teacher's scores, one row per training row (positive first), from the cache or computed now.

    Returns:
        ``(scores, record)``: a ``(rows, 1 + per_query)`` float tensor, and what ``metrics.json`` keeps of it.
    """
    config, teacher = recipe.teacher, teacher or check_teacher(recipe.teacher)
    rows = training_rows(data, train_ids, negatives)
    pairs = [(data.queries[q], data.corpus[d]) for q, docs in rows for d in docs]
    file = _cache_file(teacher, config.model, pairs, "scores")
    tensors, hit = _cached(file, lambda: {"scores": _score(teacher, config.model, pairs, device)})
    scores = tensors["scores"].reshape(len(rows), -1).float()
    return scores, _record(config, teacher, len(rows), (file, hit), scores)


def teacher_embeddings(recipe, data, train_ids: list[str], negatives, device: str, teacher: Teacher | None = None):
    """For ``in_batch_kl``: the teacher's embeddings of the training queries and documents, and each row's indices.

    Returns:
        ``(indices, (queries, documents), record)``: indices is a ``(rows, 2 + per_query)`` int64 tensor (query,
        positive, negatives) into the two embedding tables; a row's cosine scores are those of :func:`teacher_labels`.
    """
    config, teacher = recipe.teacher, teacher or check_teacher(recipe.teacher)
    rows = training_rows(data, train_ids, negatives)
    queries, documents = (
        sorted({data.queries[q] for q, _ in rows}),
        sorted({data.corpus[d] for _, ds in rows for d in ds}),
    )
    file = _cache_file(teacher, config.model, [(q, "") for q in queries] + [("", d) for d in documents], "embeddings")
    tables, hit = _cached(file, lambda: _tables(teacher, config.model, queries, documents, device))
    qi, di = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(documents)}
    indices = torch.tensor([[qi[data.queries[q]], *(di[data.corpus[d]] for d in ds)] for q, ds in rows])
    q, d = tables["queries"], tables["documents"]
    scores = (q[indices[:, :1]] * d[indices[:, 1:]]).sum(-1)
    return indices, (q, d), _record(config, teacher, len(rows), (file, hit), scores)


def _cache_file(teacher: Teacher, model_config, pairs: list[tuple[str, str]], what: str) -> Path:
    """The cache file for these texts under this teacher: its files, its settings and every text in order."""
    settings = {
        "kind": teacher.kind,
        "identity": model_identity(teacher.path),
        "model": model_config.model_dump(exclude={"batch_size"}),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for q, d in pairs:
        digest.update(f"{len(q)}:{q}{len(d)}:{d}".encode())
    name = digest.hexdigest()[:32] + ("" if what == "scores" else f"-{what}")
    return default_cache_dir().parent / "teacher_scores" / f"{name}.safetensors"


def _cached(file: Path, compute) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors in ``file``, or ``compute()`` saved there; and whether they came from the file."""
    from safetensors.torch import load_file

    with stage("teacher scores"):
        if file.is_file():
            return load_file(str(file)), True
        tensors = compute()
    save_tensors(file, tensors)
    return tensors, False


def _record(config, teacher: Teacher, rows: int, cache: tuple[Path, bool], scores: torch.Tensor) -> dict:
    """What ``metrics.json`` keeps of the teacher; ``scores`` are the rows' (positive first), for the margin."""
    return {
        "model": config.model.name,
        "kind": teacher.kind,
        "loss": config.loss,
        "temperature": temperature_of(config, teacher) if config.loss != "margin_mse" else None,
        "mnrl_weight": config.mnrl_weight,
        "rows": rows,
        "cache": {"file": str(cache[0]), "hit": cache[1]},
        "mean_margin": float((scores[:, :1] - scores[:, 1:]).mean()),
    }


@torch.no_grad()
def _score(teacher: Teacher, model_config, pairs: list[tuple[str, str]], device: str) -> torch.Tensor:
    if teacher.kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(
            str(teacher.path), device=device, local_files_only=True, max_length=model_config.max_seq_length
        )
        return (
            model.predict(
                pairs, batch_size=model_config.batch_size, activation_fn=torch.nn.Identity(), convert_to_tensor=True
            )
            .float()
            .cpu()
            .reshape(-1)
        )
    from sentence_transformers import SimilarityFunction

    queries, documents = sorted({q for q, _ in pairs}), sorted({d for _, d in pairs})
    q, d, similarity = _embed(teacher, model_config, queries, documents, device)
    qi, di = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(documents)}
    rows_q, rows_d = q[torch.tensor([qi[a] for a, _ in pairs])], d[torch.tensor([di[b] for _, b in pairs])]
    return SimilarityFunction.to_similarity_pairwise_fn(similarity)(rows_q, rows_d).reshape(-1)


def _tables(teacher: Teacher, model_config, queries: list[str], documents: list[str], device: str) -> dict:
    """in_batch_kl's tables: the teacher's embeddings, normalised when it scores by cosine, so a dot product is
    its score (:func:`check_teacher` refused any other score before the run began)."""
    q, d, similarity = _embed(teacher, model_config, queries, documents, device)
    if similarity == "cosine":
        q, d = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    return {"queries": q.contiguous(), "documents": d.contiguous()}


@torch.no_grad()
def _embed(teacher: Teacher, model_config, queries: list[str], documents: list[str], device: str):
    """A bi-encoder teacher's query and document embeddings, with its own prompts, and its similarity's name."""
    from finetune.models import load_sentence_transformer

    model, _, prompts = load_sentence_transformer(model_config.model_copy(update={"name": str(teacher.path)}), device)
    kwargs = {"batch_size": model_config.batch_size, "convert_to_tensor": True}
    q = model.encode_query(queries, prompt=prompts.query, **kwargs).float().cpu()
    d = model.encode_document(documents, prompt=prompts.document, **kwargs).float().cpu()
    return q, d, model.similarity_fn_name
