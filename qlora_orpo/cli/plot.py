"""``qlora-orpo plot``: redraw a run's training curves (``runs/<name>/curves.png``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .parsing import OneLineParser

DESCRIPTION = "Redraw the training curves of one or more runs: writes <run>/curves.png from its metrics.jsonl."
PARSER_KWARGS: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")


def build_parser(prog: str = "qlora-orpo plot") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..evaluation.plots import plot_run

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
