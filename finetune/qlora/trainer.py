"""sentence-transformers' trainer, taught to resume LoRA runs and to stop on a non-finite loss.

A LoRA checkpoint holds only the adapter, which the stock trainer cannot load back into a 4-bit
model; :func:`load_lora_checkpoint` puts it into the live model instead, for resuming and for
restoring the best checkpoint. Resuming otherwise is the trainer's own: optimizer, scheduler,
RNG states and the position in the epoch's batch order come back from the checkpoint folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformerTrainer

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite at ``step``; training stopped before the optimizer step."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss is {value} at step {step}")
        self.step, self.value = step, value


class FinetuneTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` that stops on a non-finite loss and resumes LoRA runs.

    Args:
        lora: The model carries LoRA adapters: checkpoints hold only them, and are loaded into
            the live (possibly 4-bit) model by :func:`load_lora_checkpoint`.
        **kwargs: As ``SentenceTransformerTrainer`` (model, args, train_dataset, loss, evaluator, ...).
    """

    def __init__(self, *, lora: bool = False, **kwargs):
        self.lora_checkpoints = lora
        super().__init__(**kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(loss.detach()).all():  # before the optimizer step, so the last checkpoint stays good
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
        return out

    def _load_from_checkpoint(self, checkpoint_path, model=None):
        if self.lora_checkpoints:
            load_lora_checkpoint(self.model, checkpoint_path)
        else:
            super()._load_from_checkpoint(checkpoint_path)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (its ``trainer_state.json`` is written last)."""
    done = [
        p
        for p in folder.glob("checkpoint-*")
        if (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def load_lora_checkpoint(model, checkpoint: str | Path) -> None:
    """Load a checkpoint's LoRA weights into ``model`` (a SentenceTransformer whose encoder carries LoRA)."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    target = model[0].auto_model
    state = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    if not isinstance(target, PeftModel):  # peft's add_adapter (our peft backend), not get_peft_model (unsloth)
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(target, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not fit the model: missing {missing[:2]}, unexpected "
            f"{result.unexpected_keys[:2]}"
        )
