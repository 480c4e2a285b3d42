"""``python -m finetune export RUN --onnx``: ONNX files for a run that finished without them.

The same export and checks as ``export.onnx: true`` (:mod:`finetune.onnx_export`), on the run's own
saved splits: fp32 against PyTorch on 32 test texts, and int8's test NDCG@10 beside PyTorch's, on the
whole corpus when it has at most :data:`CHECK_DOCUMENTS` documents, else on the test positives and a
seeded sample. ``metrics.json["export"]["onnx"]`` and the model card are rewritten in place.

Example (not run: it needs a model, data or a server)::
    record = export_run_onnx(Path("runs/qlora-faq-..."))
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from finetune.errors import FinetuneError

CHECK_DOCUMENTS = 5_000


def export_run_onnx(run_dir: Path, echo=print) -> dict:
    """Write ``run_dir/model/onnx/``, check it, and record it in the run's ``metrics.json`` and model card.

    Raises:
        FinetuneError: The run is unfinished, its model has remote code, or it is not one encoder stack.
    """
    from sentence_transformers import SentenceTransformer

    from finetune.atomic import write_json
    from finetune.data import load_data
    from finetune.model_card import write_model_card
    from finetune.models import saved_model_type
    from finetune.onnx_export import export_checked, onnx_line, require_onnx, why_not_exportable
    from finetune.recipe import load_recipe
    from finetune.splits import Splits

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file() or not (run_dir / "model").is_dir():
        raise FinetuneError("not a finished run with a model/ folder; finish or resume it first", where=str(run_dir))
    if saved_model_type(run_dir / "model") == "CrossEncoder":
        raise FinetuneError(
            "export --onnx writes a bi-encoder's graph, and this model/ is a CrossEncoder (a reranker run)",
            where=str(run_dir / "model"),
        )
    require_onnx()
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    if any(getattr(config, "trust_remote_code", False) for config in recipe.model_configs().values()):
        raise FinetuneError("code from the checkpoint's repository is not traced to ONNX", where=str(run_dir))
    model = SentenceTransformer(str(run_dir / "model"), device="cpu")
    reason = why_not_exportable(model)
    if reason:
        raise FinetuneError(f"cannot export to ONNX: {reason}", where=str(run_dir / "model"))
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    data, splits = load_data(recipe.data), Splits.load(run_dir / "splits.json")
    test, prompts = splits.test, metrics.get("prompts") or {}
    doc_ids = _documents(data, test, recipe.seed)
    queries, texts = [data.queries[q] for q in test], [data.corpus[d] for d in doc_ids]
    ours = (
        model.encode_query(queries, prompt=prompts.get("query"), convert_to_tensor=True).cpu(),
        model.encode_document(texts, prompt=prompts.get("document"), convert_to_tensor=True).cpu(),
    )
    record = export_checked(model, run_dir / "model", data, test, doc_ids, prompts, ours, recipe.model.batch_size)
    metrics.setdefault("export", {})["onnx"] = record
    if metrics.get("card"):  # runs from before cards recorded their kind's facts keep their card
        write_model_card(run_dir / "model", model, recipe, metrics, splits.data_fingerprint, metrics["card"])
    write_json(metrics_path, metrics)
    echo(onnx_line(record))
    return record


def _documents(data, test: list[str], seed: int) -> list[str]:
    """The whole corpus when it is small enough, else every test positive and a seeded sample, in corpus order."""
    doc_ids = list(data.corpus)
    if len(doc_ids) <= CHECK_DOCUMENTS:
        return doc_ids
    keep = {d for q in test for d in data.relevant[q]}
    rest = [d for d in doc_ids if d not in keep]
    keep |= set(random.Random(seed).sample(rest, max(0, CHECK_DOCUMENTS - len(keep))))
    return [d for d in doc_ids if d in keep]
