"""Redraw a run's training curves: ``python scripts/plot.py runs/<name>`` writes runs/<name>/curves.png."""

import argparse
import sys
from pathlib import Path

from qlora_orpo.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        try:
            paths = plot_run(run_dir)
        except (FileNotFoundError, ValueError) as exc:  # ValueError: a malformed metrics line
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        print("\n".join(str(p) for p in paths) if paths else f"{run_dir}: nothing logged yet, no plot written")
    return status


if __name__ == "__main__":
    sys.exit(main())
