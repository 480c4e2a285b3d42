"""Predict an encoder fine-tune's peak GPU memory before the run, from the model's config alone.

Peak = weights + what trains (parameters, gradients, optimizer state) + activations kept for
backward + the loss's embedding buffers. Every term is counted on the encoder built on the
``meta`` device (:mod:`finetune.memory.activations`): parameter shapes give the weight and
optimizer bytes exactly, a forward pass gives the activation bytes; no weights are loaded.

What each method holds (as this toolkit builds them; see :mod:`finetune.qlora.backend`):

- ``nf4``: every ``nn.Linear`` weight in 4 bits (half a byte) plus its block scales (one
  float32 per 64 weights, or with double quantisation one byte per 64 and a float32 per 256
  blocks), as bitsandbytes stores them; the other parameters, LoRA and the activations in the
  compute dtype.
- ``lora16``: the checkpoint and LoRA in the compute dtype (bf16).
- ``full``: float32 master weights, autocast's bf16 copies of the linear weights during the
  step, float32 gradients.

Optimizer state per trained tensor: AdamW, two moments in the parameter's dtype; 8-bit AdamW
(bitsandbytes), 2 bytes a value plus a float32 scale per 256 values for each of its two states
and two 256-entry maps, and 8 bytes a value for tensors under 4,096 values (kept in 32 bits).

Example:
    >>> from transformers import BertConfig
    >>> shape = EncoderShape(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
    ...                                 intermediate_size=128), dim=64)
    >>> plain = estimate(shape, "lora16", Setup(batch_size=32, seq_length=128))
    >>> ckpt = estimate(shape, "lora16", Setup(batch_size=32, seq_length=128, checkpointing=True))
    >>> ckpt.activations < plain.activations and ckpt.weights == plain.weights
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from finetune.memory.activations import ActivationProfile, layer_count, meta_encoder, profile

METHODS = {"nf4": "nf4 LoRA", "lora16": "16-bit LoRA", "full": "full"}
BNB_MIN_8BIT = 4096  # bitsandbytes keeps smaller tensors' optimizer state in 32 bits
GiB = 2**30


@dataclass(frozen=True)
class Setup:
    """What a training step looks like.

    Args:
        batch_size: The logical batch (MNRL's in-batch negatives).
        seq_length: Tokens per text at most (the model's cut); without ``column_lengths`` every text is this long.
        columns: Texts per example: anchor, positive and each negative.
        column_lengths: Tokens per column, anchor first, when the data is known: sentence-transformers
            tokenizes a column at a time, so each pads to its own longest text (short queries beside
            long passages). Empty: every column ``seq_length``.
        checkpointing: Gradient checkpointing on every layer.
        cached: ``CachedMultipleNegativesRankingLoss``: gradients flow through ``mini_batch_size`` texts at a time.
        mini_batch_size: For the cached loss.
        optimizer: ``adamw_8bit``, ``paged_adamw_8bit`` or ``adamw_torch``.
        dtype: The compute dtype: ``bfloat16``/``float16`` (a GPU: the base of 16-bit LoRA is held in it and
            full fine-tuning runs under autocast) or ``float32`` (a CPU: everything in float32).
        double_quant: nf4 with double quantisation of the block scales.
        lora_r: LoRA rank.
        lora_targets: ``auto`` or names, as ``lora.target_modules``.
        attention: ``fused`` (a GPU's FlashAttention / memory-efficient kernels) or ``math`` (a CPU's,
            which keeps every seq x seq score matrix for backward).
    """

    batch_size: int
    seq_length: int
    columns: int = 2
    checkpointing: bool = False
    cached: bool = False
    mini_batch_size: int | None = None
    optimizer: str = "adamw_8bit"
    dtype: str = "bfloat16"
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "auto"
    attention: str = "fused"
    column_lengths: tuple[int, ...] = ()

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens of each column's texts in the planned step."""
        return self.column_lengths or (self.seq_length,) * self.columns


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes of one method, by part."""

    method: str
    weights: int
    trainable: int  # trained parameters (LoRA), their gradients and the optimizer state
    activations: int
    loss_buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.loss_buffers

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "weights": self.weights,
            "trainable_and_optimizer": self.trainable,
            "activations": self.activations,
            "loss_buffers": self.loss_buffers,
            "total": self.total,
        }


class EncoderShape:
    """An encoder's parameter inventory and activation profiles, from its config, on the meta device.

    Args:
        config: A ``transformers`` config.
        dim: The sentence embedding's size (after any Dense head).
        name: For the printed plan.
    """

    def __init__(self, config, dim: int, name: str = ""):
        self.config, self.dim, self.name = config, dim, name or getattr(config, "model_type", "model")
        self._profiles: dict[tuple, ActivationProfile] = {}

    @cached_property
    def _meta(self):
        with torch.random.fork_rng(devices=[]):  # building a model draws; a run's stream must not move
            return meta_encoder(self.config, torch.bfloat16)

    @cached_property
    def tensors(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(name, shape, is a Linear weight) for every parameter."""
        linear = {f"{n}.weight" for n, m in self._meta.named_modules() if isinstance(m, torch.nn.Linear)}
        return [(n, tuple(p.shape), n in linear) for n, p in self._meta.named_parameters()]

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.tensors)

    @property
    def layers(self) -> int:
        return layer_count(self.config)

    def lora_tensors(self, setup: Setup) -> list[int]:
        """Sizes of the LoRA A and B matrices the recipe's targets add."""
        names = self.lora_targets(setup)
        modules = dict(self._meta.named_modules())
        return [
            n for t in names for n in (setup.lora_r * modules[t].in_features, modules[t].out_features * setup.lora_r)
        ]

    def lora_targets(self, setup: Setup) -> list[str]:
        from finetune.lora_targets import resolve_targets

        return resolve_targets(self._meta, setup.lora_targets)[0]

    def profile(self, method: str, setup: Setup) -> ActivationProfile:
        key = (method, setup.seq_length, setup.lora_r, setup.lora_targets, setup.dtype, setup.attention)
        if key not in self._profiles:
            compute = getattr(torch, setup.dtype)
            autocast = None if compute == torch.float32 else compute  # a GPU run trains under autocast
            params = torch.float32 if method == "full" else compute  # full: float32 masters
            lora = None if method == "full" else (self.lora_targets(setup), setup.lora_r)
            trainable = "full" if method == "full" else "lora"
            with torch.random.fork_rng(devices=[]):  # as _meta: the plan is asked from inside a run too
                self._profiles[key] = profile(
                    self.config, params, setup.seq_length, trainable, lora, autocast, setup.attention
                )
        return self._profiles[key]


def weight_bytes(shape: EncoderShape, method: str, setup: Setup) -> int:
    """Bytes of the model's own weights as the method holds them (LoRA not included)."""
    half = setup.dtype != "float32"
    if method == "full":  # float32 masters (+ autocast's 16-bit copies of the linear weights)
        return sum(4 * math.prod(s) + (2 * math.prod(s) if linear and half else 0) for _, s, linear in shape.tensors)
    if method == "lora16":
        return (2 if half else 4) * shape.parameters
    total = 0
    for _, s, linear in shape.tensors:
        n = math.prod(s)
        if not linear:
            total += (2 if half else 4) * n
            continue
        blocks = math.ceil(n / 64)
        # scales: uint8 per block, a float32 per 256 blocks, their 256-entry code and offset; else float32 per block
        scales = blocks + 4 * math.ceil(blocks / 256) + 1028 if setup.double_quant else 4 * blocks
        total += math.ceil(n / 2) + scales + 64  # + the 16-entry NF4 code
    return total


def optimizer_bytes(sizes: list[int], optimizer: str, value_bytes: int = 4) -> int:
    """Optimizer state for trained tensors of ``sizes`` values each, of ``value_bytes`` bytes a value."""
    if optimizer == "adamw_torch":  # two moments in the parameters' dtype
        return sum(2 * value_bytes * n for n in sizes)
    # two uint8 states, a float32 scale per 256 values for each, and each state's 256-entry map
    return sum(2 * n + 8 * math.ceil(n / 256) + 2048 if n >= BNB_MIN_8BIT else 8 * n for n in sizes)


def trainable_bytes(shape: EncoderShape, method: str, setup: Setup) -> int:
    """Trained parameters, their gradients (same dtype), and the optimizer state.

    Full fine-tuning trains float32 masters (counted in :func:`weight_bytes`); LoRA matrices are
    created in the compute dtype (``add_adapter`` on a bf16 or 4-bit/bf16-compute base gives bf16).
    """
    if method == "full":
        sizes = [math.prod(s) for _, s, _ in shape.tensors]
        return 4 * sum(sizes) + optimizer_bytes(sizes, setup.optimizer)
    sizes = shape.lora_tensors(setup)
    per_value = 4 if setup.dtype == "float32" else 2
    return 2 * per_value * sum(sizes) + optimizer_bytes(sizes, setup.optimizer, per_value)


def activation_bytes(shape: EncoderShape, method: str, setup: Setup) -> int:
    """Activations kept for backward, column by column at its own length, plus one checkpointed layer's
    recomputation (one column at a time: the longest's)."""
    ckpt = setup.checkpointing
    profiles = [shape.profile(method, replace(setup, seq_length=n)) for n in setup.lengths]
    longest = max(profiles, key=lambda p: p.seq_length)
    if setup.cached:  # a mini-batch of any column at a time: the longest column's is the peak
        return setup.mini_batch_size * (longest.kept(ckpt) + longest.recompute(ckpt))
    return setup.batch_size * (sum(p.kept(ckpt) for p in profiles) + longest.recompute(ckpt))


def loss_bytes(shape: EncoderShape, setup: Setup) -> int:
    """The loss's float32 embeddings (and, cached, their gradients) and its similarity matrix with softmax."""
    texts = setup.batch_size * setup.columns
    similarity = 2 * 4 * setup.batch_size * setup.batch_size * (setup.columns - 1)
    return 4 * texts * shape.dim * (2 if setup.cached else 1) + similarity


def estimate(shape: EncoderShape, method: str, setup: Setup) -> Estimate:
    """Predicted peak memory of one training step of ``method`` (``nf4``, ``lora16``, ``full``)."""
    return Estimate(
        method=method,
        weights=weight_bytes(shape, method, setup),
        trainable=trainable_bytes(shape, method, setup),
        activations=activation_bytes(shape, method, setup),
        loss_buffers=loss_bytes(shape, setup),
    )


def encoding_bytes(shape: EncoderShape, batch_size: int, seq_length: int, attention: str = "math") -> int:
    """Predicted peak bytes of encoding with ``shape``'s model in float32, without gradients: its weights, and
    ``batch_size`` texts of ``seq_length`` tokens through one layer at a time. Autograd saves for a whole layer
    more than an inference pass holds at once, so one layer's saves bound that pass from above (all-mpnet-base-v2,
    256 tokens: 22.7 MiB a text counted, 16.0 measured; ``benchmarks/teacher_rss.py``)."""
    one = shape.profile("full", Setup(batch_size, seq_length, dtype="float32", attention=attention))
    return 4 * shape.parameters + batch_size * (one.total // one.layers)


def largest_fit(shape: EncoderShape, method: str, setup: Setup, memory: int) -> int | None:
    """The largest batch (plain loss) or ``mini_batch_size`` (cached loss, at the setup's batch) whose
    estimate fits ``memory`` bytes; ``None`` when even 2 (plain) or 1 (cached) does not."""
    if setup.cached:

        def at(n):
            return replace(setup, mini_batch_size=n)

        low, high = 1, setup.batch_size
    else:

        def at(n):
            return replace(setup, batch_size=n)

        low, high = 2, 1 << 16
    if estimate(shape, method, at(low)).total > memory:
        return None
    while low < high:  # memory grows with the batch: bisect for the last size that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if estimate(shape, method, at(mid)).total <= memory else (low, mid - 1)
    return low
