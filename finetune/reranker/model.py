"""The reranker: the user's checkpoint as sentence-transformers' ``CrossEncoder`` (full, 16-bit LoRA or 4-bit
QLoRA), and its export as a plain ``CrossEncoder(path)`` folder that reproduces the run's scores.

A checkpoint with a one-logit classification head keeps it; a decoder LLM (``*ForCausalLM``) is scored by the
log-odds of "yes" over "no" at its last token (sentence-transformers' ``LogitScore``); any other encoder gets a
new one-logit head, which starts random and is trained in full (LoRA or not). :func:`head_line` says which.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.lora_targets import resolve_targets
from finetune.models import resolve_model
from finetune.qlora.backend import compute_dtype_for, keep_cpu_weights_trainable

HEADS = ("classifier", "score")  # the one-logit head of *ForSequenceClassification (BERT-class; Qwen/Llama-class)
CHECK_PAIRS = 256  # pairs the reloaded folder is compared on
PAIR_LENGTH = 512  # tokens a pair is cut to by default: longer is rare, and an LLM's 32k window would set batch memory


@dataclass(frozen=True)
class Head:
    """What scores a pair: ``kind`` is ``own`` (the checkpoint's classification head), ``new`` or ``yes_no``."""

    kind: str
    architecture: str

    def line(self) -> str:
        return {
            "own": f"head: the checkpoint's own one-logit classification head ({self.architecture})",
            "new": f"head: new one-logit classification head, random at the start and trained in full (the "
            f"checkpoint, {self.architecture}, has none)",
            "yes_no": f"head: log-odds of 'yes' over 'no' from the language-model head ({self.architecture})",
        }[self.kind]


def find_head(path: Path, where: str, trust_remote_code: bool = False) -> Head:
    """Which head a checkpoint folder gives its reranker (read from its config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    architecture = (config.architectures or ["unknown architecture"])[0]
    if architecture.endswith("ForCausalLM"):
        return Head("yes_no", architecture)
    if architecture.endswith("ForSequenceClassification"):
        labels = config.num_labels  # transformers leaves a default 2 out of config.json
        if labels != 1:
            raise FinetuneError(
                f"the checkpoint's classification head has {labels} labels and a reranker scores with one; start "
                "from its base encoder (a new one-logit head is added) or a one-label cross-encoder",
                where=where,
            )
        return Head("own", architecture)
    return Head("new", architecture)


def load_reranker(recipe, device: str, quantize: bool = True):
    """The recipe's ``model`` as a ``CrossEncoder``, 4-bit when ``quantization: nf4`` (and ``quantize``), LoRA added
    for ``method: lora`` (and ``quantize``; ``quantize=False`` is the full-precision base the LoRA merges into).

    Returns:
        ``(cross_encoder, head, lora_targets)``.
    """
    from sentence_transformers import CrossEncoder

    resolved = resolve_model(recipe.model.name)
    head = find_head(resolved.path, f"model.name {recipe.model.name}", recipe.model.trust_remote_code)
    dtype = compute_dtype_for(recipe.compute_dtype, device)
    kwargs, lora = {}, quantize and recipe.method == "lora"
    if lora and recipe.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=recipe.double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(HEADS),  # the head trains in full, at full precision
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else device
    if lora:
        kwargs["dtype"] = dtype
    model = CrossEncoder(
        str(resolved.path),
        num_labels=1 if head.kind == "new" else None,
        max_length=recipe.model.max_seq_length,
        device=None if "device_map" in kwargs else device,
        trust_remote_code=recipe.model.trust_remote_code,
        local_files_only=True,
        model_kwargs=kwargs or None,
    )
    if recipe.model.max_seq_length is None and model.max_length > PAIR_LENGTH:
        model.max_length = PAIR_LENGTH
    if "quantization_config" in kwargs:
        keep_cpu_weights_trainable(model)
    targets = _add_lora(model, recipe, head) if lora else []
    return model, head, targets


def _add_lora(model, recipe, head: Head) -> list[str]:
    from peft import get_peft_model

    inner = model[0].model
    targets, _ = resolve_targets(inner, recipe.lora.target_modules)
    targets = [t for t in targets if t.rsplit(".", 1)[-1] not in HEADS]
    heads = [n for n in HEADS if head.kind != "yes_no" and hasattr(inner, n)]
    # the classification head (new or the checkpoint's) trains in full beside the LoRA layers
    config = recipe.lora.peft_config(targets, modules_to_save=heads or None)
    inner.requires_grad_(False)
    model[0].model = get_peft_model(inner, config)
    return targets


def trainable_counts(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export(recipe, trained, device: str, folder: Path):
    """Write ``folder``, a plain ``CrossEncoder`` folder (for LoRA: merged into the full-precision checkpoint).

    Returns:
        ``(exported, reloaded)``: the model written, and ``CrossEncoder(folder)`` as a user would load it.
    """
    from sentence_transformers import CrossEncoder

    exported = trained
    if recipe.method == "lora":
        from peft import PeftModel

        exported, _, _ = load_reranker(recipe, device, quantize=False)
        with tempfile.TemporaryDirectory() as tmp:
            trained[0].model.save_pretrained(tmp)
            merged = PeftModel.from_pretrained(exported[0].model, tmp).merge_and_unload()
        exported[0].model = merged.to(torch.float32)
    exported.save(str(folder))
    return exported, CrossEncoder(str(folder), device=device, local_files_only=True)


def max_difference(a, b, pairs: list[tuple[str, str]], batch_size: int) -> float:
    """The largest |logit difference| of two rerankers over ``pairs`` (0 when there are none, or they are one model:
    full fine-tuning exports the model it trained)."""
    if not pairs or a is b:
        return 0.0
    identity = torch.nn.Identity()
    scores = [
        m.predict(pairs, batch_size=batch_size, activation_fn=identity, convert_to_tensor=True).float().cpu()
        for m in (a, b)
    ]
    return float((scores[0] - scores[1]).abs().max())
