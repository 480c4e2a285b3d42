"""Choose and build the encoder-training backend: unsloth, peft + bitsandbytes, or full fine-tuning.

Nothing here imports unsloth or bitsandbytes at module level: unsloth raises on a machine
without a GPU (and must be imported before transformers), and bitsandbytes is optional.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
from dataclasses import dataclass

import torch

from finetune.errors import FinetuneError
from finetune.lora_targets import resolve_targets, summarise
from finetune.memory.activations import set_checkpointing
from finetune.qlora.config import QLoRARecipe
from finetune.qlora.stack import check_fidelity, check_pooling_inputs, cosine_to, override_pooling, set_head_trainable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    """What will actually run; printed as one line before training."""

    backend: str  # unsloth | peft | full
    device: str
    quantization: str  # nf4 | none
    compute_dtype: torch.dtype

    def describe(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return f"backend {self.backend}, device {self.device}, quantization {self.quantization}, compute dtype {dtype}"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def select_backend(
    recipe: QLoRARecipe, device: str, cuda_available: bool | None = None, unsloth_installed: bool | None = None
) -> BackendChoice:
    """Decide the backend for ``recipe`` on ``device``; an explicit request that cannot run is an error, not
    a fallback.

    Args:
        recipe: The validated recipe.
        device: ``cpu``, ``cuda`` or ``mps`` (from :func:`finetune.models.pick_device`).
        cuda_available, unsloth_installed: Overrides for tests; detected when ``None``.
    """
    cuda = (device == "cuda") if cuda_available is None else cuda_available
    has_unsloth = _installed("unsloth") if unsloth_installed is None else unsloth_installed
    if recipe.method == "full":
        backend = "full"
    elif recipe.backend == "unsloth":
        if not cuda:
            raise FinetuneError(
                "backend 'unsloth' needs a CUDA GPU and this machine has none; use backend=peft or backend=auto",
                where="recipe: backend",
            )
        if not has_unsloth:
            raise FinetuneError(
                "backend 'unsloth' is not installed; pip install -e '.[unsloth]' on a GPU machine, or use "
                "backend=peft",
                where="recipe: backend",
            )
        backend = "unsloth"
    elif recipe.backend == "auto" and cuda and has_unsloth:
        backend = "unsloth"
    else:
        backend = "peft"
    require_libraries(recipe, device)
    return BackendChoice(backend, device, recipe.quantization, compute_dtype_for(recipe.compute_dtype, device))


def require_libraries(recipe, device: str) -> None:
    """What ``method: lora`` and ``quantization: nf4`` need, checked before anything loads: peft, bitsandbytes, and
    a device bitsandbytes runs on (every kind that trains LoRA: qlora, reranker)."""
    if recipe.method == "lora" and not _installed("peft"):
        raise FinetuneError("LoRA needs peft; pip install -e '.[qlora]'", where="recipe: method")
    if recipe.quantization == "nf4":
        if not _installed("bitsandbytes"):
            raise FinetuneError(
                "4-bit NF4 needs bitsandbytes; pip install -e '.[qlora]', or set quantization=none",
                where="recipe: quantization",
            )
        if device == "mps":
            raise FinetuneError(
                "bitsandbytes 4-bit does not run on mps; use quantization=none or device=cpu",
                where="recipe: quantization",
            )


def preload_unsloth(recipe) -> bool:
    """Import unsloth before anything imports transformers, when this recipe will use it.

    unsloth patches transformers and sentence-transformers at import, so it must come first; the
    CLI calls this right after reading the recipe. Returns whether unsloth was imported.
    """
    if getattr(recipe, "kind", None) != "qlora" or recipe.method != "lora" or recipe.backend == "peft":
        return False
    if recipe.device == "cpu" or not torch.cuda.is_available() or not _installed("unsloth"):
        return False
    if "transformers" in sys.modules:
        logger.warning("transformers was imported before unsloth; unsloth's patches may be incomplete")
    import unsloth  # noqa: F401

    return True


def compute_dtype_for(requested: str, device: str) -> torch.dtype:
    """``compute_dtype``, ``auto`` resolved: bf16 on CUDA (fp16 where the GPU lacks bf16), float32 elsewhere."""
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_encoder(recipe: QLoRARecipe, choice: BackendChoice, quantize: bool = True, reference=None):
    """The checkpoint's own ``SentenceTransformer`` stack, 4-bit or 16-bit when the choice says so, LoRA added.

    Everything ``SentenceTransformer(path)`` loads is kept: pooling, Dense layers, Normalize and
    prompts (:mod:`finetune.qlora.stack`); ``recipe.pooling`` other than ``auto`` replaces the
    pooling mode. The head after the transformer is frozen unless ``lora.train_head``.

    Args:
        recipe: For the model, pooling, LoRA settings.
        choice: From :func:`select_backend`.
        quantize: False builds the full-precision base (for merging and the fidelity check).
        reference: The checkpoint as ``load_sentence_transformer`` loaded it, when the caller
            has it: unsloth's stack copies its head modules and prompts instead of loading it again.

    Returns:
        ``(model, lora_targets)``: the model, and the adapted layers' full names (empty without LoRA).
    """
    from finetune.models import load_sentence_transformer

    if choice.backend == "unsloth" and quantize:
        return _build_unsloth(recipe, choice, reference)
    model_kwargs = {}
    if quantize and choice.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=recipe.double_quant,
            bnb_4bit_compute_dtype=choice.compute_dtype,
        )
        model_kwargs["device_map"] = {"": 0} if choice.device == "cuda" else choice.device
        # the weights that stay unquantised (embeddings, norms, biases) in the compute dtype, as 16-bit
        # LoRA holds them: in float32 they would double every activation (docs/memory.md)
        model_kwargs["dtype"] = choice.compute_dtype
    elif quantize and recipe.method == "lora":
        model_kwargs["dtype"] = choice.compute_dtype  # 16-bit LoRA on GPUs: the frozen base in bf16/fp16
    quantized = "quantization_config" in model_kwargs
    model, _, _ = load_sentence_transformer(
        recipe.model, device=None if quantized else choice.device, model_kwargs=model_kwargs
    )
    if recipe.pooling != "auto":
        override_pooling(model, recipe.pooling)
    if quantized:
        keep_cpu_weights_trainable(model)
    targets: list[str] = []
    if quantize and recipe.method == "lora":
        targets = _add_lora(model, recipe)
        set_head_trainable(model, recipe.lora.train_head)
    if quantize and recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    return model, targets


def enable_checkpointing(model) -> None:
    """Gradient checkpointing on the transformer, the same way for nf4 LoRA, 16-bit LoRA and full.

    Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings
    (LoRA) work without peft's input hook, and the trainer's own switch is not needed.
    """
    auto_model = model[0].auto_model
    if not getattr(auto_model, "supports_gradient_checkpointing", False):
        raise FinetuneError(
            f"{type(auto_model).__name__} does not support gradient checkpointing; set "
            "train.gradient_checkpointing=false",
            where="recipe: train.gradient_checkpointing",
        )
    set_checkpointing(auto_model, True)


def keep_cpu_weights_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for fast CPU inference during evaluation.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight the first time it runs without
    gradients (the trainer's evaluation); the next training step then fails inside autograd
    ("a view of a leaf Variable ... in-place"). Training needs the unpacked format throughout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_targets(model, recipe: QLoRARecipe) -> list[str]:
    """Full names of the layers inside ``model[0].auto_model`` that get LoRA (see :mod:`finetune.lora_targets`)."""
    names, rule = resolve_targets(model[0].auto_model, recipe.lora.target_modules)
    if rule:
        logger.info("LoRA targets by the %s: %s", rule, summarise(names))
    return names


def _add_lora(model, recipe: QLoRARecipe) -> list[str]:
    from peft import TaskType

    auto_model = model[0].auto_model
    targets = lora_targets(model, recipe)
    # only LoRA trains. Not peft's prepare_model_for_kbit_training: it upcasts every unquantised
    # weight to float32, and with them the residual stream, doubling activation memory on a GPU
    # (a 262k-token embedding matrix alone: 0.8 GB). Checkpointing: enable_checkpointing, after LoRA.
    auto_model.requires_grad_(False)
    model.add_adapter(recipe.lora.peft_config(targets, task_type=TaskType.FEATURE_EXTRACTION))
    return targets


def _build_unsloth(recipe: QLoRARecipe, choice: BackendChoice, reference=None):
    """unsloth's fast encoder, carrying the checkpoint's own head modules and prompts.

    ``FastSentenceTransformer`` rebuilds the stack itself (it reads the pooling mode and drops
    Dense layers); the modules after its transformer are replaced by the checkpoint's own.
    """
    from unsloth import FastSentenceTransformer

    from finetune.models import load_sentence_transformer, resolve_model, saved_max_length

    path = resolve_model(recipe.model.name).path
    nf4 = choice.quantization == "nf4"
    model = FastSentenceTransformer.from_pretrained(
        model_name=str(path),
        max_seq_length=recipe.model.max_seq_length or saved_max_length(path) or 256,
        load_in_4bit=nf4,
        load_in_16bit=not nf4,  # unsloth's default; it refuses 4-bit and 16-bit together
        dtype=choice.compute_dtype,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    if reference is None:
        reference, _, _ = load_sentence_transformer(recipe.model, device="cpu")
    for name in list(model._modules)[1:]:
        del model._modules[name]
    for i, module in enumerate(list(reference.children())[1:], start=1):  # copies: the reference is still scored
        model._modules[str(i)] = copy.deepcopy(module).to(choice.device)
    model.prompts = dict(reference.prompts)  # already the run's resolved prompts (finetune.prompts.apply_prompts)
    if recipe.pooling != "auto":
        override_pooling(model, recipe.pooling)
    targets = lora_targets(model, recipe)
    model = FastSentenceTransformer.get_peft_model(
        model,
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        bias=recipe.lora.bias,
        use_rslora=recipe.lora.use_rslora,
        use_gradient_checkpointing=recipe.train.gradient_checkpointing,
        random_state=recipe.seed,
    )
    set_head_trainable(model, recipe.lora.train_head)
    return model, targets


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # two NF4 values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def training_sample(data, train_ids: list[str]) -> tuple[list[str], list[str]]:
    """A few of the run's own train queries and their documents, for the fidelity checks."""
    ids = train_ids[:8]
    docs = list(dict.fromkeys(d for q in ids for d in sorted(data.relevant[q])))[:8]
    return [data.queries[q] for q in ids], [data.corpus[d] for d in docs]


def build_checked(recipe, choice, reference, queries: list[str], documents: list[str], pooling_overridden: bool):
    """The training model, built after proving that the recipe's stack is the checkpoint's.

    Returns:
        ``(model, lora_targets, fidelity)``: the fidelity check's numbers, with how far 4-bit (or
        16-bit) rounding moves the embeddings.
    """
    check_pooling_inputs(reference, queries)
    exact = recipe.quantization == "none" and choice.compute_dtype == torch.float32 and choice.backend != "unsloth"
    if not exact:  # the 4-bit/16-bit model differs by rounding: check the full-precision build instead
        built, _ = build_encoder(recipe, choice, quantize=False)
        fidelity = check_fidelity(built, reference, queries, documents, pooling_overridden)
        del built
    model, lora_targets = build_encoder(recipe, choice, reference=reference)
    if exact:  # at step 0 LoRA adds nothing, so the training model itself must match
        fidelity = check_fidelity(model, reference, queries, documents, pooling_overridden)
    ours, theirs = [type(m).__name__ for m in model.children()], [type(m).__name__ for m in reference.children()]
    if ours != theirs:
        raise FinetuneError(
            f"the training model's modules {' -> '.join(ours)} are not the checkpoint's {' -> '.join(theirs)}",
            where="fidelity check",
        )
    if not pooling_overridden:  # how far 4-bit (or 16-bit) rounding moves the embeddings, for the record
        cos = cosine_to(reference, model, queries, documents)
        fidelity.update(training_model_min_cosine=float(cos.min()), training_model_mean_cosine=float(cos.mean()))
    return model, lora_targets, fidelity
