"""A QLoRA run's export: the checkpoint at full precision with the trained LoRA merged in, saved as a
plain sentence-transformers folder (its own pooling, head and prompts), and the checks that it
reproduces what was trained.
"""

from __future__ import annotations

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
