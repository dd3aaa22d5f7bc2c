"""Gain-against-time points and plot of a sweep (qlora_orpo.evaluation.sweep), on hand-made metrics records."""

import pytest

from qlora_orpo.evaluation.sweep import gain_curve, minutes_at, plot_gain_curves, training_minutes_by_step


def _train(step, seconds):
    return {"step": step, "split": "train", "seconds_per_step": seconds, "loss": 1.0}


def _eval(step, tag, accuracy, **extra):
    return {"step": step, "split": "eval", "tag": tag, "reward_accuracy": accuracy, **extra}


def test_training_minutes_weight_each_log_window_by_its_steps():
    # logs every 5 steps: 5 steps at 12 s, then 5 at 24 s, then 2 at 30 s (a last partial window)
    minutes = training_minutes_by_step([_train(10, 24.0), _train(5, 12.0), _train(12, 30.0), _eval(5, "periodic", 0.5)])
    assert minutes == pytest.approx({5: 1.0, 10: 3.0, 12: 4.0})
    assert minutes_at(minutes, 0) == 0.0 and minutes_at(minutes, 11) == pytest.approx(3.0)


def test_gain_curve_is_taken_against_the_before_evaluation():
    records = [_eval(0, "before", 0.50), _train(5, 60.0), _eval(5, "periodic", 0.55), _train(10, 60.0),
               _eval(10, "after", 0.58, selected_step=10)]
    curve = gain_curve(records)
    assert [p[0] for p in curve] == [0, 5, 10]
    assert [v for p in curve for v in p[1:]] == pytest.approx([0.0, 0.0, 5.0, 0.05, 10.0, 0.08])
    assert gain_curve([r for r in records if r.get("tag") != "before"]) == []


def test_gain_curve_keeps_the_last_steps_model_when_select_best_shipped_an_earlier_one():
    # select_best logs the last step's model as "last", then the shipped step-5 model as "after" at step 10
    records = [_eval(0, "before", 0.50), _train(5, 60.0), _eval(5, "periodic", 0.60), _train(10, 60.0),
               _eval(10, "last", 0.52), _eval(10, "after", 0.60, selected_step=5)]
    assert [(s, round(g, 3)) for s, _, g in gain_curve(records)] == [(0, 0.0), (5, 0.1), (10, 0.02)]


def test_plot_gain_curves_writes_a_png(tmp_path):
    points = [(0, 0.0, 0.0), (40, 11.0, 0.07), (80, 22.0, 0.08)]
    path = plot_gain_curves([("a", points, (80, 0.03, 0.13)), ("b", [], None)], tmp_path / "g.png", "t", 0.10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))
