"""ONNX export of an exported encoder (``model/``): fp32 and int8, for CPU serving without PyTorch.

The graph is the whole sentence-transformers stack, traced with ``torch.onnx``: token ids in,
``last_hidden_state`` (the transformer's output) and ``sentence_embedding`` (after the checkpoint's own
pooling, Dense layers and normalisation) out. The files follow sentence-transformers' ONNX backend layout
(``onnx/model.onnx``, ``onnx/model_qint8_avx512_vnni.onnx``), so the folder loads with
``SentenceTransformer(folder, backend="onnx")`` where optimum is installed; ``onnxruntime`` alone reads
``sentence_embedding``; fastembed, which pools the first output itself, loads it as a custom model.

The int8 file is onnxruntime's dynamic quantization (int8 weights per output channel, activations
quantized at run time).

Example (not run: it needs a model, data or a server)::
    report = export_onnx(SentenceTransformer("runs/qlora-faq-.../model"), Path("runs/qlora-faq-.../model"), texts)
    OnnxEncoder(Path("runs/qlora-faq-.../model"), "int8").encode(["how do I get a permit?"])
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FILES = {"fp32": "onnx/model.onnx", "int8": "onnx/model_qint8_avx512_vnni.onnx"}
MIN_COSINE = 0.999  # fp32 ONNX against PyTorch, on every sample text


class _Stack(nn.Module):
    """The model's modules as one traceable function of the tokenizer's tensors."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        out = self.model(dict(zip(self.names, tensors)))
        return out["token_embeddings"], out["sentence_embedding"]


def require_onnx() -> None:
    """Refuse ``export.onnx`` up front, before anything is written, when onnx or onnxruntime is missing."""
    import importlib.util

    missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
    if missing:
        raise FinetuneError(
            f"export.onnx needs {' and '.join(missing)}; pip install 'finetune[onnx]', or set export.onnx=false",
            where="export.onnx",
        )


def why_not_exportable(model) -> str | None:
    """Why ``model`` cannot be exported as one ONNX graph, or None when it can."""
    from sentence_transformers.sentence_transformer.modules import Router, Transformer

    modules = list(model.children())
    if any(isinstance(m, Router) for m in modules):
        return "its queries and documents go through different modules (a Router); ONNX export takes one stack"
    if not modules or not isinstance(modules[0], Transformer):
        return f"its first module is {type(modules[0]).__name__ if modules else 'missing'}, not a Transformer"
    return None


def export_onnx(model, folder: Path, sample: list[str]) -> dict:
    """Write ``folder/onnx/`` (fp32 and int8) from ``model`` and check the fp32 graph against it.

    Args:
        model: The ``SentenceTransformer`` saved in ``folder``.
        folder: The model folder; ``onnx/`` is written beside its weights (renamed into place when whole).
        sample: Texts the check encodes both ways (with whatever prompts they need already prepended).

    Returns:
        ``{"files": {...}, "fp32_min_cosine": c, "int8_min_cosine": c8, "inputs": [...]}``.

    Raises:
        FinetuneError: The model cannot be exported, or the fp32 graph's embeddings differ from PyTorch's.
    """
    reason = why_not_exportable(model)
    if reason:
        raise FinetuneError(f"cannot export to ONNX: {reason}", where="export.onnx")
    model = model.cpu().eval()
    features = model.preprocess(sample[:2])
    names = [n for n in INPUTS if n in features]
    partial = folder / "onnx.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    axes = {n: {0: "batch", 1: "sequence"} for n in (*names, "last_hidden_state")}
    axes["sentence_embedding"] = {0: "batch"}
    # the tracer's warnings are about Python branches fixed at trace time; the cosine check below is what
    # shows whether the trace holds for other inputs, so they are not shown to the user
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Stack(model, names),
            tuple(features[n] for n in names),
            str(partial / "model.onnx"),
            input_names=names,
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency
        )
    _quantize(partial / "model.onnx", partial / Path(FILES["int8"]).name)
    shutil.rmtree(folder / "onnx", ignore_errors=True)
    partial.rename(folder / "onnx")
    _truncate_where_the_model_does(folder, model.max_seq_length)
    reference = model.encode(sample, convert_to_numpy=True)
    cosines = {p: _min_cosine(OnnxEncoder(folder, p, model).encode(sample), reference) for p in FILES}
    if cosines["fp32"] < MIN_COSINE:
        raise FinetuneError(
            f"the fp32 ONNX graph's embeddings differ from PyTorch's (min cosine {cosines['fp32']:.5f} < "
            f"{MIN_COSINE}); the model's stack does not trace; use the PyTorch model/",
            where=str(folder / FILES["fp32"]),
        )
    record = {"files": FILES, "inputs": names, "min_cosine_required": MIN_COSINE}
    return record | {f"{p}_min_cosine": c for p, c in cosines.items()}


def export_checked(
    model, folder: Path, data, test: list[str], doc_ids: list[str], prompts: dict, ours, batch_size: int = 32
) -> dict:
    """:func:`export_onnx` with a sample of the run's own texts, then the int8 graph's test NDCG@10 beside the
    PyTorch model's, on the documents ``doc_ids``.

    Args:
        model: The ``SentenceTransformer`` in ``folder``.
        test: The test query ids.
        prompts: ``{"query": ..., "document": ...}``, prepended as text (ONNX clients have no prompts).
        ours: The PyTorch model's ``(embeddings of the test queries, embeddings of doc_ids)``.
        batch_size: The int8 graph's batch: its activations are quantized per batch, so the figure depends on it.

    Returns:
        :func:`export_onnx`'s record with ``documents``, ``pytorch_ndcg@10`` and ``int8_ndcg@10``.
    """
    from finetune.precision import ndcg_at_precision, relevant_rows

    queries, texts = [data.queries[q] for q in test], [data.corpus[d] for d in doc_ids]
    sample = [(prompts.get("query") or "") + t for t in queries[:16]]
    sample += [(prompts.get("document") or "") + t for t in texts[:16]]
    record = export_onnx(model, folder, sample)
    relevant = relevant_rows(data, test, doc_ids)
    int8 = OnnxEncoder(folder, "int8", model)
    theirs = torch.from_numpy(int8.encode(queries, batch_size, prompts.get("query")))
    theirs_docs = torch.from_numpy(int8.encode(texts, batch_size, prompts.get("document")))
    return record | {
        "documents": len(doc_ids),
        "pytorch_ndcg@10": ndcg_at_precision(ours[0], ours[1], relevant, "float32"),
        "int8_ndcg@10": ndcg_at_precision(theirs, theirs_docs, relevant, "float32"),
    }


def onnx_line(record: dict) -> str:
    """The run's one line about its ONNX files."""
    return (
        f"onnx: model/{record['files']['fp32']} (min cosine to PyTorch {record['fp32_min_cosine']:.5f}) and "
        f"model/{record['files']['int8']} (test NDCG@10 {record['int8_ndcg@10']:.4f}, PyTorch "
        f"{record['pytorch_ndcg@10']:.4f}, on {record['documents']:,} documents)"
    )


class OnnxEncoder:
    """Encode texts with ``folder/onnx/`` through onnxruntime alone (the model's tokenizer, the graph's
    ``sentence_embedding``).

    Args:
        folder: A model folder with ``onnx/``.
        precision: ``fp32`` or ``int8``.
        model: The ``SentenceTransformer`` whose tokenizer to use (default: loaded from ``folder``).
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, folder: Path, precision: str = "fp32", model=None, threads: int | None = None):
        import onnxruntime as ort

        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(folder), device="cpu")
        self.model = model
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        path = str(folder / FILES[precision])
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int = 32, prompt: str | None = None) -> np.ndarray:
        """The graph's ``sentence_embedding`` of ``texts`` (``prompt`` prepended), in order: what ``model.encode``
        gives (normalised where the model normalises)."""
        texts = [f"{prompt}{t}" for t in texts] if prompt else list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # like encode: fewer pad tokens per batch
        parts = []
        for start in range(0, len(texts), batch_size):
            features = self.model.preprocess([texts[i] for i in order[start : start + batch_size]])
            feed = {n: features[n].numpy() for n in self.names}
            parts.append(self.session.run(["sentence_embedding"], feed)[0])
        if not parts:
            return np.empty((0, 0), dtype=np.float32)
        out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out


def _quantize(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights per output channel, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process is for static quantization of CNNs
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.getLogger().setLevel(quiet)


def _truncate_where_the_model_does(folder: Path, max_seq_length: int | None) -> None:
    """Set ``tokenizer_config.json``'s ``max_length`` to the model's ``max_seq_length``.

    sentence-transformers passes its own ``max_length`` when it tokenizes, but ONNX clients that read the
    folder's tokenizer files (fastembed takes the smaller of ``max_length`` and ``model_max_length``) would
    otherwise cut long texts elsewhere: all-MiniLM-L6-v2 ships ``max_length: 128`` for a model that reads 256.
    """
    import json

    from finetune.atomic import write_text

    path = folder / "tokenizer_config.json"
    if not max_seq_length or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("max_length") not in (None, max_seq_length):
        write_text(path, json.dumps(config | {"max_length": max_seq_length}, indent=2, ensure_ascii=False) + "\n")


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())
