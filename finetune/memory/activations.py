"""Activation bytes per sequence, counted on the meta device: what autograd keeps for backward.

The encoder is built from its config on the ``meta`` device (no weights, no memory), with LoRA
injected when the method trains LoRA, and run forward on one sequence of the planned length
inside ``saved_tensors_hooks``: every tensor autograd saves is counted once (views are counted
as their base), parameters excepted. So the count follows the model's own code: its layers,
MLP width, GQA heads, LoRA placement and which inputs a frozen layer does not need to keep.

Attention is counted as a fused kernel keeps it (FlashAttention / memory-efficient SDPA on a
GPU: q, k, v, the output and a float32 log-sum-exp per head and position), or, for a CPU run, as
the math path keeps it (``attention="math"``: every seq x seq score matrix, its softmax and the
dropout's). Training with attention dropout, a CPU's SDPA takes that path.

Gradient checkpointing keeps only each layer's input, and recomputes one layer at a time in
backward; :class:`ActivationProfile` holds the pieces to price both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from finetune.memory.autocast import MetaAutocast

ATTENTION = "finetune_fused_estimate"


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a fused attention kernel: saves what FlashAttention saves."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)  # [batch, heads, seq]
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the planner only counts the forward's saved tensors
        raise RuntimeError("the memory planner's attention stand-in has no backward")


def fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A ``transformers`` attention function (registered as :data:`ATTENTION`) for the planner."""
    out = _FusedAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, fused_attention)


@dataclass(frozen=True)
class ActivationProfile:
    """Saved bytes for ONE sequence of ``seq_length`` tokens, both measured on the meta model.

    Attributes:
        total: Everything autograd keeps through the forward, without checkpointing.
        checkpointed: What it keeps with every layer checkpointed (the layers' inputs and what
            runs outside the layers: embeddings, final norm).
        layers: Number of transformer layers.
        seq_length: Tokens per sequence.
        can_checkpoint: False for an architecture transformers cannot checkpoint (MPNet): then checkpointed = total.
    """

    total: int
    checkpointed: int
    layers: int
    seq_length: int
    can_checkpoint: bool = True

    @property
    def per_layer(self) -> int:
        """One layer's saves beyond its input: what backward rebuilds when it recomputes the layer."""
        return max(0, (self.total - self.checkpointed) // self.layers)

    def kept(self, checkpointing: bool) -> int:
        """Bytes kept per sequence from the forward until backward."""
        return self.checkpointed if checkpointing else self.total

    def recompute(self, checkpointing: bool) -> int:
        """Extra bytes per sequence while one checkpointed layer is recomputed in backward."""
        return self.per_layer if checkpointing else 0


def meta_encoder(config, dtype: torch.dtype, attention: str = "fused"):
    """The encoder of ``config`` on the meta device, in ``dtype``, with the planner's attention
    (``fused``: a GPU kernel's saves; ``math``: a CPU's, the eager path's)."""
    from transformers import AutoModel

    _register()
    config = type(config).from_dict(config.to_dict())  # a copy: the attention choice is ours only
    config._attn_implementation = ATTENTION if attention == "fused" else "eager"
    config.use_cache = False  # an encoder pass; a cache only warns under checkpointing
    with torch.device("meta"):
        return AutoModel.from_config(config, dtype=dtype)


def _count_saved(model, seq_length: int, autocast: torch.dtype | None = None) -> int:
    """Bytes autograd saves for one sequence through ``model``'s forward (parameters, and autocast's
    copies of them, excepted), under CUDA autocast's dtype rules when ``autocast`` is given."""
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        kept.setdefault(id(base), base)
        return tensor

    ids = torch.zeros(1, seq_length, dtype=torch.long, device="meta")
    model.train()
    mode = MetaAutocast(autocast) if autocast is not None else contextlib.nullcontext()
    # no mask: a batch without padding, the planned worst case (a mask of ones is dropped too)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        model(input_ids=ids)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    weights |= {c.untyped_storage()._cdata for c in getattr(mode, "weight_copies", [])}
    return sum(t.numel() * t.element_size() for t in kept.values() if t.untyped_storage()._cdata not in weights)


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on every layer of a ``transformers`` model, on or off
    (``activation_checkpointing_*`` where this transformers has it, its older name otherwise)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def layer_count(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def profile(
    config,
    dtype: torch.dtype,
    seq_length: int,
    trainable: str,
    lora=None,
    autocast: torch.dtype | None = None,
    attention: str = "fused",
) -> ActivationProfile:
    """Count one sequence's saved activations for ``config``.

    Args:
        config: A ``transformers`` config (``AutoConfig``).
        dtype: The parameters' dtype (float32 masters for full fine-tuning; the compute dtype for
            a LoRA base).
        seq_length: Tokens per sequence.
        trainable: ``full`` (every weight), ``lora`` (LoRA only: ``lora`` must be given).
        lora: ``(target_names, r)`` for ``trainable="lora"``.
        autocast: The autocast dtype of a GPU run (``torch.bfloat16``), or ``None`` (a CPU run).
        attention: ``fused`` (a GPU's attention kernels) or ``math`` (a CPU's).

    Returns:
        The :class:`ActivationProfile`.
    """
    model = meta_encoder(config, dtype, attention)
    if trainable == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets, r = lora
        model.requires_grad_(False)
        model = inject_adapter_in_model(LoraConfig(r=r, target_modules=targets), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        model.requires_grad_(True)
    total = _count_saved(model, seq_length, autocast)
    # checkpointed layers save through the checkpoint's own hooks: the outer count sees only what
    # the checkpointed forward keeps
    if not getattr(model, "supports_gradient_checkpointing", False):
        # MPNet and others: the run refuses train.gradient_checkpointing, so nothing is saved by it
        return ActivationProfile(total, total, layer_count(config), seq_length, can_checkpoint=False)
    set_checkpointing(model, True)
    try:
        checkpointed = _count_saved(model, seq_length, autocast)
    finally:
        set_checkpointing(model, False)
    return ActivationProfile(total, checkpointed, layer_count(config), seq_length)
