"""The training progress a person reads: one bar with the step, the latest loss and the latest validation NDCG@10.

transformers' own ``ProgressCallback`` writes every log dict (16 keys per evaluation) into the middle of its
bar. :class:`TrainingBar` takes its place; the full log history still goes to ``metrics.json``
(``log_history``) and TensorBoard.

Example:
    >>> bar = TrainingBar()
    >>> bar.postfix({"loss": 1.23456}), bar.postfix({"eval_val_cosine_ndcg@10": 0.5, "epoch": 1.0})
    ('loss 1.2346', 'loss 1.2346, val ndcg@10 0.5000')
"""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class TrainingBar(TrainerCallback):
    """One tqdm bar over the optimizer steps; its postfix holds the latest loss and validation NDCG@10."""

    def __init__(self):
        self.bar, self.loss, self.val = None, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # a resumed run starts where its checkpoint left off
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(logs or {}), refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def postfix(self, logs: dict) -> str:
        """Take the loss and validation NDCG@10 from one log entry; the bar's postfix text."""
        self.loss = logs.get("loss", self.loss)
        ndcg = [v for k, v in logs.items() if k.startswith("eval_") and k.endswith("ndcg@10")]
        self.val = ndcg[0] if ndcg else self.val
        parts = [f"loss {self.loss:.4f}" if self.loss is not None else None]
        parts.append(f"val ndcg@10 {self.val:.4f}" if self.val is not None else None)
        return ", ".join(p for p in parts if p)


def use_training_bar(trainer) -> None:
    """Replace the trainer's printing callbacks (the bar that prints log dicts, or the plain printer) with
    :class:`TrainingBar`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingBar())
