"""Training curves from a run's ``metrics.jsonl``, as PNG files in the run directory.

``plot_run(run_dir)`` writes ``curves.png``: six panels against the optimizer step -- the
loss, its NLL and odds-ratio parts, the reward accuracy, the reward margin and the log-odds
ratio -- with the training records as lines (raw values faint under a centred mean once a
run has 20 or more log points) and the held-out evaluations (``before``, ``periodic``,
``after``) as markers.
``train.run`` calls it at the end of every run; ``scripts/plot.py runs/<name>`` redraws it.

Matplotlib is used through its object-oriented API with the Agg canvas: no pyplot, no
global backend switch, no display needed, and nothing left open between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..training.metrics import read_metrics

CURVES_FILE = "curves.png"
# (panel title, metrics.jsonl key)
PANELS = (
    ("loss = NLL + beta * L_OR", "loss"),
    ("NLL of the chosen response", "nll"),
    ("odds-ratio loss L_OR", "or_loss"),
    ("reward accuracy (share with logp_w > logp_l)", "reward_accuracy"),
    ("reward margin beta * (logp_w - logp_l)", "reward_margin"),
    ("log-odds ratio", "log_odds_ratio"),
)
TRAIN_COLOUR, EVAL_COLOUR = "C0", "C3"
EVAL_MARKERS = {"before": "s", "periodic": "o", "after": "D"}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key)) and _finite(r.get("step"))]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred mean over ``window`` values (fewer at the ends), same length as ``values``.

    Centred rather than trailing, so the smoothed curve does not lag behind the eval markers.
    """
    half_before, half_after = (window - 1) // 2, window // 2
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half_before), min(len(values), i + half_after + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def smoothing_window(n: int) -> int:
    """Points averaged in the train curve: about a tenth of the run, 1 (raw) for short runs, at most 25."""
    return max(1, min(25, n // 10))


def _plot_train(ax, steps: list[float], values: list[float]) -> None:
    window = smoothing_window(len(values))
    if window > 1:
        ax.plot(steps, values, color=TRAIN_COLOUR, alpha=0.25, linewidth=0.8, label="train")
        ax.plot(steps, moving_average(values, window), color=TRAIN_COLOUR, linewidth=1.6,
                label=f"train, mean of {window}")
    else:
        ax.plot(steps, values, color=TRAIN_COLOUR, linewidth=1.4, marker="." if len(values) < 30 else None,
                label="train")


def _plot_eval(ax, records: Sequence[dict[str, Any]], key: str) -> None:
    steps, values = _series(records, key)
    if not steps:
        return
    ax.plot(steps, values, color=EVAL_COLOUR, linestyle=":", linewidth=1.0, alpha=0.8)
    for tag, marker in EVAL_MARKERS.items():
        s, v = _series([r for r in records if r.get("tag") == tag], key)
        if s:
            ax.scatter(s, v, color=EVAL_COLOUR, marker=marker, s=42, edgecolors="black", linewidths=0.6,
                       zorder=3, label=f"held-out eval ({tag})")


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Draw the panels of ``records`` (metrics.jsonl objects) into ``path``; None if nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r.get("step", 0))
    evals = sorted((r for r in records if r.get("split") == "eval"), key=lambda r: r.get("step", 0))
    if not train and not evals:
        return None
    fig = Figure(figsize=(15, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    legend: dict[str, Any] = {}
    for ax, (panel_title, key) in zip(axes, PANELS, strict=True):
        steps, values = _series(train, key)
        if steps:
            _plot_train(ax, steps, values)
        _plot_eval(ax, evals, key)
        if key == "reward_accuracy":
            ax.set_ylim(-0.05, 1.05)
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        elif key in ("reward_margin", "log_odds_ratio"):
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # keeps ".png" so savefig picks the format
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's curves into ``run_dir``; returns the files written (none if nothing was logged).

    Raises FileNotFoundError when ``run_dir`` has no ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    written = plot_curves(read_metrics(metrics), run_dir / CURVES_FILE, title=f"ORPO run {run_dir.name}")
    return [written] if written is not None else []
