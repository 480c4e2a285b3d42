"""A finished run checked against a real vector database: Qdrant (``qdrant-client``), scored from its own results.

The run's exported model is served the way a user deploys it, and the test NDCG@10 is computed from
the ids the database returns, then compared with the run's ``metrics.json``:

- one encoder stack (``qlora``): the corpus indexed with the exported model, through its ONNX file and
  fastembed when the run wrote ``model/onnx/`` (else through sentence-transformers);
- a query route and a document route over one checkpoint (``adapter``, a Router): the corpus indexed once,
  with the base model itself; base queries (that model) and tuned queries (the exported model's
  ``encode_query``) both search that one collection, which is never rebuilt.

Qdrant runs in local mode (``QdrantClient(path=...)`` or ``":memory:"``): the same client API as a Qdrant
server, with no server to start.

Example (not run: it needs a model, data or a server)::
    report = round_trip(Path("runs/adapter-faq-..."), QdrantClient(":memory:"))
    report["tuned"], report["run"]["tuned"]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.precision import ndcg_at_10

COLLECTION = "documents"
BATCH = 1024  # points per upsert


def index(client, doc_ids: list[str], vectors: np.ndarray) -> None:
    """Create the collection (cosine distance) and upsert every document, ``doc_id`` in the payload."""
    from qdrant_client import models

    client.create_collection(
        COLLECTION, vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE)
    )
    for start in range(0, len(doc_ids), BATCH):
        points = [
            models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"doc_id": doc_ids[i]})
            for i in range(start, min(start + BATCH, len(doc_ids)))
        ]
        client.upsert(COLLECTION, points=points, wait=True)


def search_ndcg(client, data, query_ids: list[str], vectors: np.ndarray) -> float:
    """Mean NDCG@10 of the database's top 10 for each query vector."""
    scores = []
    for qid, vector in zip(query_ids, vectors):
        hits = client.query_points(COLLECTION, query=vector.tolist(), limit=10, with_payload=True).points
        scores.append(ndcg_at_10([h.payload["doc_id"] for h in hits], data.relevant[qid]))
    return float(np.mean(scores))


def round_trip(run_dir: Path, client) -> dict:
    """Index the run's corpus in ``client`` and score the run's test split from the database's results.

    Returns:
        ``{"tuned": ndcg, "base": ndcg (routed models), "run": {"base", "tuned"}, "points", "collections",
        "client"}``.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Router

    from finetune.data import load_data
    from finetune.models import resolve_model
    from finetune.recipe import load_recipe
    from finetune.splits import Splits

    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    data, test = load_data(recipe.data), Splits.load(run_dir / "splits.json").test
    doc_ids, queries = list(data.corpus), [data.queries[q] for q in test]
    exported = SentenceTransformer(str(run_dir / "model"), device="cpu")
    out = {"run": {k: metrics[k]["ndcg@10"] for k in ("base", "tuned")}}
    if any(isinstance(m, Router) for m in exported.children()):
        # the index the user already has: the base model's, built once with SentenceTransformer(base) itself;
        # the base row's queries are that model's, and the tuned ones the exported model's query route
        (config,) = recipe.model_configs().values()
        base = SentenceTransformer(str(resolve_model(config.name).path), device="cpu")
        prompts = metrics.get("prompts") or {}
        encode_query = exported.encode_query
        encode_document = lambda texts: base.encode_document(texts, prompt=prompts.get("document"))  # noqa: E731
        base_queries = base.encode_query(queries, prompt=prompts.get("query"))
        out["client"] = "sentence-transformers"
    else:
        encode_query, encode_document, out["client"] = _one_stack_encoders(run_dir, exported)
        base_queries = None
    index(client, doc_ids, encode_document([data.corpus[d] for d in doc_ids]))
    out["tuned"] = search_ndcg(client, data, test, encode_query(queries))
    if base_queries is not None:
        out["base"] = search_ndcg(client, data, test, base_queries)
    out["points"] = client.count(COLLECTION).count
    out["collections"] = len(client.get_collections().collections)
    return out


def _one_stack_encoders(run_dir: Path, exported):
    """Query and document encoders for a one-stack model (qlora): fastembed over ``model/onnx/model.onnx`` when
    it exists (prompts prepended, as fastembed has none), else the exported model itself."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    folder = run_dir / "model"
    if not (folder / "onnx" / "model.onnx").is_file():
        return (lambda t: exported.encode_query(t)), (lambda t: exported.encode_document(t)), "sentence-transformers"
    prompts = exported.prompts
    modules = list(exported.children())[1:]
    pooling = getattr(modules[0], "pooling_mode", None) if modules else None
    fastembed_can = pooling in ("mean", "cls") and all(isinstance(m, (Pooling, Normalize)) for m in modules)
    if not fastembed_can:  # a Dense head, or a pooling fastembed lacks: onnxruntime reads sentence_embedding
        from finetune.onnx_export import OnnxEncoder

        onnx = OnnxEncoder(folder, "fp32", exported, threads=2)
        return (
            lambda t: onnx.encode(t, prompt=prompts.get("query")),
            lambda t: onnx.encode(t, prompt=prompts.get("document")),
            "onnxruntime (onnx/model.onnx)",
        )
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = f"finetune-local/{run_dir.name}"
    if name not in {m["model"] for m in TextEmbedding.list_supported_models()}:
        TextEmbedding.add_custom_model(
            model=name,
            pooling={"mean": PoolingType.MEAN, "cls": PoolingType.CLS}[pooling],
            normalization=True,
            sources=ModelSource(hf=name),
            dim=exported.get_embedding_dimension(),
            model_file="onnx/model.onnx",
        )
    model = TextEmbedding(model_name=name, specific_model_path=str(folder), threads=2)

    def encoder(key: str):
        prompt = prompts.get(key) or ""
        return lambda texts: np.array(list(model.embed([prompt + t for t in texts], batch_size=64)))

    return encoder("query"), encoder("document"), "fastembed (onnx/model.onnx)"
