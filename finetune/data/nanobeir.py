"""NanoBEIR as ``eval.also`` sets: sentence-transformers' ``NanoBEIREvaluator`` loads them from the Hub.

``eval.also: [nanobeir]`` scores all thirteen NanoBEIR sets, ``nanobeir:scifact,nfcorpus`` a subset
(the evaluator's names). Each set becomes :class:`~finetune.data.dataset.RetrievalData`, so it is
scored by the same evaluator settings and embedding cache as any other extra set. NanoBEIR is a
benchmark (50 queries a set), so all its queries are test queries and it has no validation split.

The Hub must be reachable, or the sets must already be in the Hugging Face cache with
``HF_HUB_OFFLINE=1``; otherwise loading stops at once with one line instead of retrying for
half a minute inside ``datasets``.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from finetune.data.dataset import RetrievalData
from finetune.errors import FinetuneError

NEEDS_HUB = (
    "NanoBEIR is read from the Hugging Face Hub ({dataset}), which cannot be reached from here ({why}); "
    "run where the Hub is reachable, set HF_HUB_OFFLINE=1 with the sets already in your Hugging Face cache, "
    "or save them as BEIR folders and list those paths instead"
)
DATASET_ID = "sentence-transformers/NanoBEIR-en"


def is_nanobeir(source: str) -> bool:
    """Whether an ``eval.also`` entry names NanoBEIR (``nanobeir`` or ``nanobeir:NAME,NAME``)."""
    return str(source).lower().split(":")[0] == "nanobeir"


def nanobeir_names(source: str) -> list[str]:
    """The NanoBEIR set names an entry asks for; all of them for a plain ``nanobeir``.

    Example:
        >>> nanobeir_names("nanobeir:SciFact, nfcorpus")
        ['scifact', 'nfcorpus']
        >>> len(nanobeir_names("nanobeir"))
        13
    """
    from sentence_transformers.sentence_transformer.evaluation.nano_beir import DATASET_NAME_TO_HUMAN_READABLE

    _, _, listed = str(source).partition(":")
    names = [n.strip().lower() for n in listed.split(",") if n.strip()] or list(DATASET_NAME_TO_HUMAN_READABLE)
    unknown = [n for n in names if n not in DATASET_NAME_TO_HUMAN_READABLE]
    if unknown:
        raise FinetuneError(
            f"'{unknown[0]}' is not a NanoBEIR set; the names are {', '.join(DATASET_NAME_TO_HUMAN_READABLE)}"
        )
    return names


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used right now (``None``: go ahead). Offline mode reads the local cache."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # datasets reads the cache; a set missing there fails below with the same line
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return None


def load_nanobeir(source: str) -> list[tuple[str, RetrievalData]]:
    """``[(label, data), ...]``, one per NanoBEIR set named by ``source``, labels like ``NanoSciFact``."""
    names = nanobeir_names(source)
    why = hub_unreachable()
    if why:
        raise FinetuneError(NEEDS_HUB.format(dataset=DATASET_ID, why=why))
    from sentence_transformers.sentence_transformer.evaluation import NanoBEIREvaluator

    try:
        evaluator = NanoBEIREvaluator(dataset_names=names, dataset_id=DATASET_ID, write_csv=False)
    except ValueError as exc:  # the evaluator wraps the datasets/hub error; its cause says why
        cause = exc.__cause__ or exc
        raise FinetuneError(NEEDS_HUB.format(dataset=DATASET_ID, why=str(cause).splitlines()[0])) from None
    out = []
    for ir in evaluator.evaluators:
        queries = {q: ir.queries[i] for i, q in enumerate(ir.queries_ids)}
        corpus = {d: ir.corpus[i] for i, d in enumerate(ir.corpus_ids)}
        relevant = {q: set(ir.relevant_docs[q]) & corpus.keys() for q in queries if q in ir.relevant_docs}
        relevant = {q: docs for q, docs in relevant.items() if docs}
        data = RetrievalData(
            queries={q: queries[q] for q in relevant},
            corpus=corpus,
            relevant=relevant,
            source=f"{DATASET_ID}/{ir.name}",
        )
        out.append((ir.name, data.check()))
    return out
