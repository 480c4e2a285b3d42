"""Stop a sweep point whose validation curve is clearly behind the sweep's leader.

A QLoRA sweep point costs minutes to hours, and most of a grid loses. The trainer scores the
validation split every ``train.eval_steps``, so a point can be compared, while it trains, with the
best point finished so far at the same stage of training: the same *epoch*, so points with other
batch sizes or step counts line up. A point whose best validation NDCG@10 so far is more than
``margin`` below the leader's best by the same epoch, at ``patience`` evaluations in a row, stops
there. Its score is its best checkpoint's, which is below the leader's, so stopping it changes no
choice except that of a point that would have overtaken the leader late.

Example:
    >>> leader = Leader([(0.5, 0.70), (1.0, 0.74)], margin=0.02)
    >>> leader.best_by(0.4), leader.best_by(0.5), leader.best_by(3.0)
    (None, 0.7, 0.74)
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback


def val_ndcg_key(entry: dict) -> str | None:
    """The validation NDCG@10 key of a ``log_history`` entry (``eval_val_cosine_ndcg@10``), or None."""
    return next((k for k in entry if k.startswith("eval_val_") and k.endswith("_ndcg@10")), None)


def validation_curve(log_history: list[dict]) -> list[tuple[float, float]]:
    """``(epoch, validation NDCG@10)`` at every evaluation in a trainer's ``log_history``."""
    curve = []
    for entry in log_history:
        key = val_ndcg_key(entry)
        if key is not None and "epoch" in entry:
            curve.append((float(entry["epoch"]), float(entry[key])))
    return curve


@dataclass
class Leader:
    """The validation curve of the sweep's best finished point, and how far behind is too far.

    Args:
        curve: ``(epoch, validation NDCG@10)`` at each of the leader's evaluations.
        margin: NDCG@10 (absolute) a point may trail the leader by before it counts as behind.
        patience: Evaluations in a row behind before the point stops.
    """

    curve: list[tuple[float, float]]
    margin: float
    patience: int = 2

    def best_by(self, epoch: float) -> float | None:
        """The leader's best validation NDCG@10 at or before ``epoch`` (None: it had not evaluated yet)."""
        seen = [value for at, value in self.curve if at <= epoch + 1e-9]
        return max(seen) if seen else None


class StopBehind(TrainerCallback):
    """Stop training when the point's best validation NDCG@10 trails ``leader`` by more than its margin.

    After training, :attr:`stopped` is None, or where it stopped: ``{"epoch", "step", "best",
    "leader_best"}``.

    Args:
        leader: The curve to keep up with.
        metric: The validation metric's key in the trainer's evaluation metrics.
    """

    def __init__(self, leader: Leader, metric: str):
        self.leader, self.metric = leader, metric
        self.best, self.behind, self.stopped = float("-inf"), 0, None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric not in metrics:
            return
        self.best = max(self.best, metrics[self.metric])
        reference = self.leader.best_by(state.epoch)
        behind = reference is not None and self.best < reference - self.leader.margin
        self.behind = self.behind + 1 if behind else 0
        if self.behind >= self.leader.patience:
            control.should_training_stop = True  # the trainer still saves this step's checkpoint first
            self.stopped = {
                "epoch": state.epoch,
                "step": state.global_step,
                "best": self.best,
                "leader_best": reference,
            }
