"""One markdown table row per run directory, from its config.yaml, evaluation.json and metrics.jsonl.

    python scripts/sweep_table.py runs/hh-*            # after runs of configs/hh-recipe.yaml
"""

import json
import sys
from pathlib import Path

import yaml

from qlora_orpo.checkpoint import read_metrics
from qlora_orpo.report import sweep_table


def training_minutes(run_dir: Path) -> float | None:
    """Seconds per step times steps, summed over the train log windows (evaluations not included)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    train = [r for r in read_metrics(path) if r.get("split") == "train" and "seconds_per_step" in r]
    steps = [r["step"] for r in train]
    windows = [b - a for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    return sum(r["seconds_per_step"] * w for r, w in zip(train, windows, strict=True)) / 60 if train else None


def main(argv: list[str]) -> int:
    rows = []
    for name in argv:
        run_dir = Path(name)
        if not (run_dir / "evaluation.json").is_file():
            print(f"{run_dir}: no evaluation.json (unfinished run?), skipped", file=sys.stderr)
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        result = json.loads((run_dir / "evaluation.json").read_text())
        rows.append((run_dir.name, config, result, training_minutes(run_dir)))
    print(sweep_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
