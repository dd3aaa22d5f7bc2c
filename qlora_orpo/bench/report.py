"""The benchmark's outputs: a markdown table, a memory-vs-length plot and ``results.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_text
from .spec import METHODS


def _mib(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _roofline(row: dict[str, Any]) -> tuple[str, str]:
    """``roofline s`` and ``time/roofline`` cells; blank where not measured (GPU rows, older results)."""
    seconds = row.get("roofline_s")
    if seconds is None or not math.isfinite(seconds):
        return "", ""
    return f"{seconds:.2f}", f"{row['roofline_ratio']:.1f}x"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per configuration; skipped and failed ones say why."""
    lines = [
        "| method | max_length | allocator | memory above baseline (MiB) | floor (MiB) | measured / floor "
        "| s / pair | roofline s | time/roofline | tokens / s | loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['method']} | {row['max_length']} | {row['allocator']} "
        if "skipped" in row or "error" in row:
            why = row.get("skipped") or row["error"].splitlines()[-1]
            lines.append(head + f"| {'skipped' if 'skipped' in row else 'failed'}: {why} | | | | | | | |")
            continue
        roofline, ratio = _roofline(row)
        lines.append(
            head + f"| {_mib(row['peak_above_baseline_mib'])} | {_mib(row['floor_step_mib'])} "
            f"| {row['floor_ratio']:.1f}x | {row['seconds_per_pair']:.2f} | {roofline} | {ratio} "
            f"| {row['tokens_per_s']:,.0f} | {row['loss']:.6f} |"
        )
    return "\n".join(lines)


def plot_memory(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """PNG of memory above the post-load baseline against max_length, one line per configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [r for r in rows if "peak_above_baseline_mib" in r]
    if not measured:
        return None
    fig = Figure(figsize=(8, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    allocators = sorted({r["allocator"] for r in measured})
    for method in METHODS:
        for allocator in allocators:
            points = sorted(
                (r["max_length"], r["peak_above_baseline_mib"], r["floor_ratio"])
                for r in measured if r["method"] == method and r["allocator"] == allocator
            )
            if not points:
                continue
            label = method if len(allocators) == 1 else f"{method} ({allocator})"
            xs, ys, ratios = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for x, y, ratio in points:
                ax.annotate(f"{ratio:.1f}x", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7,
                            color=line.get_color())
    floor = sorted({(r["max_length"], r["floor_step_mib"]) for r in measured})
    ax.plot(*zip(*floor, strict=True), linestyle="--", marker="x", color="grey",
            label="analytic floor (models/floor.py); labels: measured / floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks([x for x, _ in floor], labels=[str(x) for x, _ in floor])
    ax.set_xlabel("max_length (tokens per side; one pair)")
    ax.set_ylabel("peak memory above post-load baseline (MiB)")
    ax.set_ylim(bottom=0)
    first = measured[0]
    default_title = f"One ORPO optimizer step ({first.get('quant', '')} base, {first.get('device', '')})"
    ax.set_title(title or default_title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``memory_vs_length.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    atomic_write_text(paths["json"], json.dumps({"settings": settings, "rows": list(rows)}, indent=2) + "\n")
    atomic_write_text(paths["markdown"], markdown_table(rows) + "\n")
    model = settings.get("model", "")
    first = next((r for r in rows if "device" in r), {})
    title = f"One ORPO optimizer step: {model}, {first.get('quant', '')} base, {first.get('device', '')}"
    png = plot_memory(rows, out_dir / "memory_vs_length.png", title=title)
    if png is not None:
        paths["png"] = png
    return paths


def describe_machine() -> dict[str, Any]:
    """CPU model, cores and GPU, for the report."""
    from ..models.dtype_probe import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
