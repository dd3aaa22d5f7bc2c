"""Compare finished runs: one markdown table row per run directory, and optionally a gain curve.

    python scripts/sweep_table.py runs/hh-*                                 # the table
    python scripts/sweep_table.py runs/hh-* --plot docs/alignment_gain.png  # and gain vs minutes

Reads each run's config.yaml, evaluation.json and metrics.jsonl. Minutes are training time
from the step timings (evaluations not included).
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from qlora_orpo.evaluation.report import sweep_table
from qlora_orpo.evaluation.sweep import gain_curve, plot_gain_curves, training_minutes_by_step
from qlora_orpo.training.metrics import read_metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--plot", type=Path, help="also draw held-out accuracy gain against training minutes here")
    parser.add_argument("--target", type=float, default=0.10, help="gain drawn as a dashed line on the plot")
    args = parser.parse_args(argv)
    rows, curves = [], []
    for run_dir in args.runs:
        if not (run_dir / "evaluation.json").is_file():
            print(f"{run_dir}: no evaluation.json (unfinished run?), skipped", file=sys.stderr)
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        result = json.loads((run_dir / "evaluation.json").read_text())
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        minutes = training_minutes_by_step(records)
        rows.append((run_dir.name, config, result, max(minutes.values()) if minutes else None))
        gain, points = result["change"]["reward_accuracy"], gain_curve(records)
        step = result.get("selected_step") or (points[-1][0] if points else 0)
        curves.append((run_dir.name, points, (step, gain["low"], gain["high"])))
    print(sweep_table(rows))
    if args.plot:
        print(f"plot: {plot_gain_curves(curves, args.plot, 'Held-out reward accuracy gain', args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
