"""Comparing runs of a sweep: held-out gain against training time, as points and as one plot.

A run's ``metrics.jsonl`` holds train records (``seconds_per_step`` averaged over the steps
since the previous record) and held-out evaluations (``tag`` ``before`` at step 0, then
``periodic`` and ``after``). ``gain_curve`` turns them into (training minutes, accuracy gain
over the run's own base evaluation) points; ``plot_gain_curves`` draws several runs on one
axis, so "what would more time buy?" can be read off the curves (docs/alignment.md).
Minutes are training time only: evaluations and loading are left out, so runs with different
evaluation schedules compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plots import save_figure

GainPoint = tuple[int, float, float]  # (step, training minutes up to that step, accuracy - base accuracy)


def training_minutes_by_step(records: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Cumulative training minutes at each logged train step.

    Each train record's ``seconds_per_step`` covers the steps since the previous train record,
    so the window is weighted by its length (a log every 5 steps counts 5 steps).
    """
    train = sorted((r for r in records if r.get("split") == "train" and "seconds_per_step" in r),
                   key=lambda r: r["step"])
    minutes, total, previous = {}, 0.0, 0
    for record in train:
        total += record["seconds_per_step"] * (record["step"] - previous) / 60
        previous = record["step"]
        minutes[record["step"]] = total
    return minutes


def minutes_at(minutes: dict[int, float], step: int) -> float:
    """Training minutes up to ``step``: the last logged step at or before it (0 before any)."""
    logged = [s for s in minutes if s <= step]
    return minutes[max(logged)] if logged else 0.0


def gain_curve(records: Sequence[dict[str, Any]]) -> list[GainPoint]:
    """(step, training minutes, reward-accuracy gain over the ``before`` evaluation) per evaluation.

    Empty when the run has no ``before`` evaluation (nothing to take the gain against).
    """
    evals = sorted((r for r in records if r.get("split") == "eval" and "reward_accuracy" in r),
                   key=lambda r: r["step"])
    base = next((r["reward_accuracy"] for r in evals if r.get("tag") == "before"), None)
    if base is None:
        return []
    minutes = training_minutes_by_step(records)
    points: dict[int, GainPoint] = {}
    for record in evals:
        step = record["step"]
        if record.get("tag") == "after" and record.get("selected_step", step) != step:
            continue  # select_best shipped an earlier checkpoint: it is already that step's point
        # otherwise a later record at the same step (the final "after") is the same model
        points[step] = (step, minutes_at(minutes, step), record["reward_accuracy"] - base)
    return [points[s] for s in sorted(points)]


def plot_gain_curves(curves: Sequence[tuple[str, list[GainPoint], tuple[int, float, float] | None]],
                     path: Path, title: str = "", target: float | None = None) -> Path:
    """One line per run: accuracy gain (points) against training minutes.

    ``curves``: (label, gain_curve points, (step, low, high) or None): the paired 95% interval
    of the gain of the model evaluated at ``step`` (evaluation.json's: the selected or the last
    step), drawn as an error bar on that point. ``target`` draws a dashed line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for index, (label, points, interval) in enumerate(curves):
        if not points:
            continue
        colour = f"C{index % 10}"
        xs, ys = [p[1] for p in points], [100 * p[2] for p in points]
        ax.plot(xs, ys, marker="o", color=colour, label=label)
        at = [i for i, p in enumerate(points) if interval is not None and p[0] == interval[0]]
        if at and all(math.isfinite(v) for v in interval[1:]):
            x, y, low, high = xs[at[0]], ys[at[0]], 100 * interval[1], 100 * interval[2]
            ax.errorbar([x], [y], yerr=[[y - low], [high - y]], color=colour, capsize=4, linewidth=1.0)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=0.9, label=f"target +{100 * target:.0f}")
    ax.set_xlabel("training minutes (evaluations not included)")
    ax.set_ylabel("held-out reward accuracy gain over the base (points)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
