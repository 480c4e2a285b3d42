"""``merge.scale``: trade the in-domain gain against what the ``eval.also`` sets lose, with one number s.

s = 0 is the base model and s = 1 the tuned one; each recipe kind knows how to build the model
at s (a scaled LoRA delta, a scaled adapter residual, interpolated weights). :func:`choose_scale`
picks s on validation only: the best in-domain validation NDCG@10 among the values whose drop
on every extra set's validation queries stays within ``max_drop`` of the base model's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.report import save_line_chart


def choose_scale(
    grid: list[float], validate: Callable[[float], dict[str, float]], max_drop: float | None = None
) -> tuple[float, list[dict]]:
    """The s to export, and every grid point's validation scores.

    Args:
        grid: Values of s, ascending; 0 (the base model) is always scored, as the reference for drops.
        validate: ``validate(s)`` gives ``{"in_domain": ndcg, "<extra label>": ndcg, ...}`` on validation queries.
        max_drop: The largest drop below s = 0 allowed on any extra set (``None``: no limit).

    Returns:
        ``(s, rows)``: rows hold ``s``, the scores and ``allowed``. Ties go to the smaller s.

    Example:
        >>> scores = {0.0: {"in_domain": 0.5, "x": 0.8}, 0.5: {"in_domain": 0.6, "x": 0.795}}
        >>> scores[1.0] = {"in_domain": 0.65, "x": 0.7}  # the best in-domain, but 0.1 lost on x
        >>> choose_scale([0.0, 0.5, 1.0], scores.get, max_drop=0.01)[0]
        0.5
    """
    points = sorted(set(grid) | {0.0})
    rows = [{"s": s, **validate(s)} for s in points]
    base = rows[0]
    for row in rows:
        drops = [base[k] - row[k] for k in row if k not in ("s", "in_domain")]
        row["allowed"] = max_drop is None or all(d <= max_drop + 1e-12 for d in drops)
    candidates = [r for r in rows if r["allowed"] and r["s"] in grid] or [base]
    best = max(candidates, key=lambda r: r["in_domain"])  # max keeps the first of equals: the smaller s
    return best["s"], rows


def merge_line(s: float, chosen: bool, at_one: dict[str, float]) -> str:
    """The run's one line about s, with the test NDCG@10 at s = 1 (scored after the choice, for reference).

    Example:
        >>> print(merge_line(0.5, True, {"in_domain": 0.7325, "disfl_qa": 0.805}).split("; ")[1])
        test NDCG@10 at s = 1, for reference: this data 0.7325, disfl_qa 0.8050
    """
    at = ", ".join(f"{'this data' if k == 'in_domain' else k} {v:.4f}" for k, v in at_one.items())
    how = " (chosen on validation)" if chosen else ""
    return f"merge.scale: s = {s:g}{how}; test NDCG@10 at s = 1, for reference: {at}"


def check_can_choose_scale(recipe, splits, extra_sets) -> None:
    """``merge.scale: auto`` chooses on validation queries: the training data's, and each extra set's."""
    if recipe.merge.scale != "auto":
        return
    if not splits.val:
        raise FinetuneError("merge.scale auto chooses s on validation queries; set splits.val_fraction above 0")
    empty = [x.label for x in extra_sets if not x.val]
    if recipe.merge.max_drop is not None and empty:
        raise FinetuneError(
            f"eval.also set {empty[0]} has no validation queries for merge.max_drop; it needs more queries"
        )


def scale_adapter(adapter: nn.Module, s: float) -> nn.Module:
    """A copy of a query adapter whose residual is scaled by ``s`` (its last layer's weight and bias)."""
    scaled = copy.deepcopy(adapter)
    last = scaled.delta if hasattr(scaled, "delta") else scaled.down
    last.weight.data.mul_(s)
    last.bias.data.mul_(s)
    return scaled


def plot_tradeoff(rows: list[dict], chosen: float, path: Path, title: str) -> None:
    """In-domain validation NDCG@10 against each extra set's, one point per s, the chosen s circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in [k for k in rows[0] if k not in ("s", "in_domain", "allowed")]:
        xs, ys = [r[label] for r in rows], [r["in_domain"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        for r in rows:
            ax.annotate(
                f"s={r['s']:g}", (r[label], r["in_domain"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
            if r["s"] == chosen:
                ax.scatter([r[label]], [r["in_domain"]], s=160, facecolors="none", edgecolors="red")
    save_line_chart(fig, ax, path, "extra set validation NDCG@10 (s=0: base)", "in-domain validation NDCG@10", title)


def lora_scale(model: nn.Module, s: float):
    """A context in which the peft model's LoRA deltas count ``s`` times (peft's ``rescale_adapter_scale``)."""
    from peft.helpers import rescale_adapter_scale

    return rescale_adapter_scale(model, s)


@torch.no_grad()
def scale_lora_in_place(model: nn.Module, s: float) -> None:
    """Multiply every LoRA ``B`` matrix by ``s``: the saved adapter and the merge then hold base + s x delta."""
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.mul_(s)


@torch.no_grad()
def interpolate(model: nn.Module, base: dict, tuned: dict, s: float) -> None:
    """Load ``base + s (tuned - base)`` into ``model`` (floating-point tensors; the rest are tuned's)."""
    model.load_state_dict(
        {
            k: (b + s * (tuned[k] - b)).to(tuned[k].dtype) if tuned[k].is_floating_point() else tuned[k]
            for k, b in base.items()
        }
    )
