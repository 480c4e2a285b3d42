"""A QLoRA run's export: the checkpoint at full precision with the trained LoRA merged in, saved as a
plain sentence-transformers folder (its own pooling, head and prompts), and the checks that it
reproduces what was trained.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from finetune.qlora.backend import build_encoder
from finetune.qlora.stack import cosine_to, embed


def unquantized_with_lora(recipe, choice, trained, device: str):
    """The checkpoint at full precision with ``trained``'s LoRA (and head) beside it, not merged yet.

    Args:
        recipe: The qlora recipe.
        choice: The backend choice the training model was built with.
        trained: The training model (4-bit or 16-bit, with LoRA).
        device: Where the returned model lives.
    """
    from peft import PeftModel

    model, _ = build_encoder(recipe, choice, quantize=False)
    with tempfile.TemporaryDirectory() as tmp:
        trained[0].auto_model.save_pretrained(tmp)
        model[0].model = PeftModel.from_pretrained(model[0].auto_model, tmp)  # auto_model reads .model
    if recipe.lora.train_head:  # the trained Dense/other modules after the transformer
        for ours, theirs in zip(list(model.children())[1:], list(trained.children())[1:]):
            ours.load_state_dict({k: v.to(torch.float32) for k, v in theirs.state_dict().items()})
    return model.to(device)


def save(run_dir: Path, recipe, trained, exported, queries: list[str], documents: list[str]):
    """Save ``lora/`` (peft format, LoRA only) and ``model/`` (the merged encoder), then check the folder.

    Returns:
        ``(merged model, export check)``: see :func:`check_export`.
    """
    from finetune.adapter.export import save_model_folder

    if recipe.method == "lora":
        trained[0].auto_model.save_pretrained(str(run_dir / "lora"))
        exported[0].model = exported[0].model.merge_and_unload()
    save_model_folder(exported, run_dir / "model")
    return exported, check_export(trained, exported, run_dir / "model", queries, documents)


def check_export(trained, merged, folder: Path, queries: list[str], documents: list[str]) -> dict:
    """``SentenceTransformer(folder)``, with only its saved prompts, must give the merged model's embeddings.

    Returns:
        ``max_abs_diff`` (reloaded against merged) and ``as_trained_min_cosine`` (merged full precision
        against the 4-bit or 16-bit model it was trained as; 1 when they are one model).
    """
    from sentence_transformers import SentenceTransformer

    reloaded = SentenceTransformer(str(folder), device=str(merged.device))
    drift = float((embed(merged, queries, documents) - embed(reloaded, queries, documents)).abs().max())
    if drift > 1e-4:
        raise RuntimeError(f"the exported model's embeddings differ from the merged model's by {drift:.2e}")
    as_trained = cosine_to(trained, merged, queries, documents) if merged is not trained else torch.ones(1)
    return {"max_abs_diff": drift, "as_trained_min_cosine": float(as_trained.min())}


def export_and_score(run, run_dir: Path, as_trained: dict) -> tuple[dict, dict]:
    """Save and check ``model/`` of a :class:`~finetune.qlora.runner.QLoRARun` ``run``, then score it.

    The exported model's test row encodes the corpus once; what merging changed is the exported and the
    as-trained model on the same documents (the test candidates, or the whole corpus when it fits); the
    stored-precision rows and ``model/onnx/`` (``export.onnx``) reuse that corpus encoding.

    Returns:
        ``(tuned row, export checks)``.
    """
    from finetune.base_corpus import encode_corpus, rows_of
    from finetune.evaluation import evaluate
    from finetune.precision import deployment_precision, relevant_rows
    from finetune.stages import stage

    data, test, batch = run.data, run.splits.test, run.recipe.model.batch_size
    queries = [data.queries[q] for q in test[:16]]
    documents = [data.corpus[d] for d in list(data.corpus)[:16]]
    with stage("export"):
        run._scored, checked = save(run_dir, run.recipe, run.model, run._scored, queries, documents)
    corpus = encode_corpus(run._scored, data, run.prompts, batch)
    tuned = run._score("test", None, corpus_embeddings=corpus)
    exported, count = tuned, len(corpus)  # the whole corpus fits the check: the tuned row is the figure
    if run.test_candidates is not None:
        rows, count = rows_of(data, corpus, run.test_candidates), len(run.test_candidates)
        exported = evaluate(run._evaluator(test, "as_trained"), run._scored, rows)
    checked["as_trained"] = {
        "documents": count,
        "ndcg@10": as_trained["ndcg@10"],
        "exported_ndcg@10": exported["ndcg@10"],
    }
    texts = [data.queries[q] for q in test]  # encoded once: stored precision and the ONNX check share them
    queries = run._scored.encode_query(texts, prompt=run.prompts.query, batch_size=batch, convert_to_tensor=True).cpu()
    rows = {"tuned": (queries, corpus)}
    run.precision["tuned"] = deployment_precision(relevant_rows(data, test), rows)["tuned"]
    if run.recipe.export.onnx:
        checked["onnx"] = save_onnx(run, run_dir, queries, corpus)
    return tuned, checked


def save_onnx(run, run_dir: Path, queries, corpus) -> dict:
    """``model/onnx/`` (fp32 and int8) of a :class:`~finetune.qlora.runner.QLoRARun` ``run`` and its checks
    (:func:`~finetune.onnx_export.export_checked`): int8 on the test candidates, or the whole corpus.

    Args:
        run: The run; ``run._scored`` is the exported model, ``queries`` its test query embeddings and ``corpus``
            its embeddings of the whole corpus.

    Returns:
        The export's record, with ``documents``, ``pytorch_ndcg@10`` and ``int8_ndcg@10``; the run says it in a line.
        When the model does not export, ``{"error": why}``: the run says why and its other outputs stay.
    """
    from finetune.base_corpus import rows_of
    from finetune.onnx_export import export_checked, onnx_line
    from finetune.stages import stage

    doc_ids = run.test_candidates or list(run.data.corpus)
    documents = rows_of(run.data, corpus, doc_ids) if run.test_candidates else corpus
    prompts = {"query": run.prompts.query, "document": run.prompts.document}
    try:
        with stage("onnx export"):
            ours, batch = (queries, documents), run.recipe.model.batch_size
            record = export_checked(
                run._scored, run_dir / "model", run.data, run.splits.test, doc_ids, prompts, ours, batch
            )
    except Exception as exc:  # a stack that does not trace, or traces wrong: the run's other outputs stay
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        for folder in ("onnx", "onnx.partial"):
            shutil.rmtree(run_dir / "model" / folder, ignore_errors=True)
        run.echo(f"onnx: not written ({reason}); model/ holds the PyTorch model")
        return {"error": reason}
    run.echo(onnx_line(record))
    return record
