"""sentence-transformers' trainer, taught to resume LoRA runs and to stop on a non-finite loss.

A LoRA checkpoint holds only the adapter, which the stock trainer cannot load back into a 4-bit
model; :func:`load_lora_checkpoint` puts it into the live model instead, for resuming and for
restoring the best checkpoint. Resuming otherwise is the trainer's own: optimizer, scheduler,
RNG states and the position in the epoch's batch order come back from the checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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

    def add_model_card_callback(self, default_args_dict) -> None:
        """No card callback (sentence-transformers' documented override): the run writes ``model/README.md`` from
        its own data and numbers (:mod:`finetune.model_card`), so the callback's dataset statistics and widget
        examples, computed when the trainer is built, would be work thrown away."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(loss.detach()).all():  # before the optimizer step, so the last checkpoint stays good
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
        return out

    def adopt(self, source: Path, train_loss: float):
        """Take over a finished training of the same recipe instead of training: its checkpoints
        (:func:`adopt_checkpoints`), its trainer state and the weights it ended with (the best
        checkpoint's where ``load_best_model_at_end``, as the trainer would have loaded them).

        ``trainer.train()`` cannot do this: resumed at its last step, it trains one step more.

        Returns:
            ``TrainOutput`` as ``train()`` would have, with the source run's ``train_loss``.
        """
        from transformers.trainer_utils import TrainOutput

        latest = adopt_checkpoints(source, Path(self.args.output_dir))
        self.state = type(self.state).load_from_json(str(latest / "trainer_state.json"))
        best = self.state.best_model_checkpoint
        self._load_from_checkpoint(best if best and self.args.load_best_model_at_end else str(latest))
        return TrainOutput(self.state.global_step, train_loss, {})

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


def run_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a qlora run directory (its ``checkpoints/`` folder)."""
    return latest_checkpoint(run_dir / "checkpoints")


def adopt_checkpoints(source: Path, folder: Path) -> Path:
    """Copy a finished run's checkpoints into ``folder``, as if trained there; return the newest.

    A sweep's final run would train exactly what its chosen point trained (same recipe, splits, seed
    and validation queries), so it takes the point's checkpoints over (:meth:`FinetuneTrainer.adopt`).
    ``trainer_state.json`` names the best checkpoint by path, so those paths are moved to ``folder``.
    Files are hard-linked where the file system allows (checkpoints are never rewritten), else copied.
    """

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, folder, copy_function=link_or_copy, dirs_exist_ok=True)  # the trainer made it
    for state_file in folder.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        best = state.get("best_model_checkpoint")
        if best:
            state["best_model_checkpoint"] = str(folder / Path(best).name)
            state_file.unlink()  # a hard link: rewrite a new file, leave the source's alone
            state_file.write_text(json.dumps(state, indent=2))
    latest = latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"{source} holds no complete checkpoint")
    return latest


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
