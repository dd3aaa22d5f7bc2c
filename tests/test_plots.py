"""Training curves: plot_run writes a PNG from metrics.jsonl, copes with gaps, and scripts/plot.py wraps it."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

from qlora_orpo.evaluation.plots import CURVES_FILE, PANELS, moving_average, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot.py"


def train_record(step: int) -> dict:
    loss_or = 0.7 - 0.01 * step
    return {"step": step, "split": "train", "loss": 2.0 - 0.02 * step + 0.1 * loss_or, "nll": 2.0 - 0.02 * step,
            "or_loss": loss_or, "log_odds_ratio": 0.05 * step, "log_odds_chosen": -1.0,
            "rewards_chosen": -0.1, "rewards_rejected": -0.12, "reward_margin": 0.002 * step,
            "reward_accuracy": min(1.0, 0.5 + 0.02 * step), "grad_norm": 1.0, "lr": 1e-4,
            "tokens_per_s": 100.0, "seconds_per_step": 1.0, "tokens": 100 * step, "peak_rss_mib": 900.0}


def eval_record(step: int, tag: str) -> dict:
    return {"step": step, "split": "eval", "tag": tag, "pairs": 8, "reward_accuracy": 0.5 + step / 100,
            "log_odds_ratio": 0.04 * step, "reward_margin": 0.002 * step, "nll": 2.1 - 0.02 * step,
            "or_loss": 0.7 - 0.01 * step, "loss": 2.2 - 0.02 * step}


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000  # six panels of curves, not an empty canvas


def test_plot_run_writes_a_png_into_the_run_directory(tmp_path):
    records = [eval_record(0, "before")]
    records += [train_record(s) for s in range(1, 41)]
    records += [eval_record(20, "periodic"), eval_record(40, "after")]
    records.append({"step": 40, "split": "summary", "steps": 40, "eval_before": None})
    run_dir = write_metrics(tmp_path / "run", records)
    paths = plot_run(run_dir)
    assert paths == [run_dir / CURVES_FILE]
    assert_png(paths[0])
    assert not list(run_dir.glob("*.tmp*"))  # written atomically, nothing left behind
    import matplotlib.image

    height, width = matplotlib.image.imread(paths[0]).shape[:2]
    assert width > height > 500


def test_short_runs_gaps_and_non_finite_values_are_drawn(tmp_path):
    records = [train_record(1), {**train_record(2), "loss": float("nan"), "reward_margin": None},
               {"step": 3, "split": "train", "nll": 1.5}, eval_record(3, "after")]
    paths = plot_run(write_metrics(tmp_path / "run", records))
    assert_png(paths[0])


def test_only_evaluations_is_enough_and_nothing_logged_writes_nothing(tmp_path):
    assert_png(plot_run(write_metrics(tmp_path / "evals", [eval_record(0, "before")]))[0])
    empty = write_metrics(tmp_path / "empty", [{"split": "summary", "steps": 0}])
    assert plot_run(empty) == []
    assert not (empty / CURVES_FILE).exists()


def test_a_directory_without_metrics_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_every_panel_key_is_logged_by_training_and_evaluation():
    for _, key in PANELS:
        assert key in train_record(1) and key in eval_record(1, "after")


def test_moving_average_is_centred():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert moving_average([1.0, 5.0], 1) == [1.0, 5.0]
    assert all(math.isfinite(v) for v in moving_average([0.1] * 50, 25))


def test_plot_script(tmp_path, capsys):
    run_dir = write_metrics(tmp_path / "run", [train_record(s) for s in range(1, 5)])
    main = runpy.run_path(str(SCRIPT), run_name="plot_script")["main"]
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / CURVES_FILE)
    assert main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
