"""``qlora-orpo bench`` (and ``scripts/bench_orpo.py``): parse, plan, run each configuration in a worker, report."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..bench.natural import NATURAL_METHODS, PEER, PEERS, NaturalSpec, markdown, run_in_subprocess
from ..bench.report import describe_machine, markdown_table, write_report
from ..bench.spec import ALLOCATORS, DEFAULT_METHODS, LENGTHS, METHODS, QUICK_LENGTHS, BenchSpec, plan
from ..bench.tiny import build_tiny_model_dir
from ..bench.worker import run_benchmark, worker_main
from ..config import EMBEDDED, OrpoConfig
from ..core.files import atomic_write_text
from .parsing import OneLineParser

DESCRIPTION = ("Peak memory, time and loss of one ORPO optimizer step: TRL's loss path vs ours "
               "(--step joint, --step split), each configuration in a fresh process.")
PARSER_KWARGS: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}


def _csv(kind: Callable[[str], Any], choices: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list{' of ' + ', '.join(map(str, choices)) if choices else ''}, got {text!r}"
            )
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=_csv(int), help=f"max_length values (default {LENGTHS}; --quick {QUICK_LENGTHS})")
    parser.add_argument("--methods", type=_csv(str, METHODS), default=list(DEFAULT_METHODS),
                        help=f"configurations to run, from {', '.join(METHODS)}")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="trim",
                        help="CPU allocator of every worker: glibc as is, glibc with trimming, or jemalloc / "
                        "mimalloc through LD_PRELOAD (skipped when not found); 'mimalloc' with the options "
                        "training sets (memory.MIMALLOC_ENV and any MIMALLOC_* in the environment), "
                        "'mimalloc-default' with none")
    parser.add_argument("--allocators", type=_csv(str, ALLOCATORS),
                        help="compare CPU allocators instead: run --step split at each length under each one")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: a tiny random model built in a temporary directory, lengths 32 and 64")
    parser.add_argument("--model", default=EMBEDDED, help="base model ('embedded' or a local directory)")
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4", help="base quantisation")
    parser.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype of the 4-bit layers (default auto; --quick: float32, so that the "
                        "tiny model's losses can be compared exactly)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--chunk-size", type=int, default=OrpoConfig.logits_chunk_size, help="logits chunk of our step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1,
                        help="optimizer steps per configuration; with more than one the first is left out of the timing")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, help="directory for results.json, results.md and memory_vs_length.png "
                        "(default bench_results/orpo-<time>)")
    parser.add_argument("--natural", type=_csv(str, (*PEERS, *NATURAL_METHODS)),
                        help="train natural-length HH pairs instead, with each tool's own trainer: TRL's "
                        f"ORPOTrainer ('{PEER}') and ours in these modes, from {', '.join(NATURAL_METHODS)} "
                        "(--steps optimizer steps of 8 pairs; --lengths default 512,1024)")
    parser.add_argument("--pack-tokens", type=int, default=0, help="with --natural: tokens per packed row of shared-packed")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)


def build_parser(prog: str = "qlora-orpo bench") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def _print_row(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    where = f"{row['method']} at {row['max_length']} ({row['allocator']})"
    if "skipped" in row:
        print(f"[bench] {where}: skipped: {row['skipped']}", file=sys.stderr)
    elif "error" in row:
        print(f"[bench] {where}: FAILED: {row['error']}", file=sys.stderr)
    else:
        print(f"[bench] {where}: {row['peak_above_baseline_mib']:,.0f} MiB above baseline, "
              f"{row['seconds_per_pair']:.2f} s/pair, loss {row['loss']:.6f}", file=sys.stderr)


def main(argv: Sequence[str] | None, script: Path | None = None) -> int:
    """Entry point of ``scripts/bench_orpo.py`` (``script``: the file the workers run) and of
    ``qlora-orpo bench`` (no script: the workers run ``python -m qlora_orpo bench --worker``)."""
    parser = build_parser(prog="bench_orpo.py" if script is not None else "qlora-orpo bench")
    return run(parser.parse_args(argv), parser, script=script, argv=argv)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, script: Path | None = None,
        argv: Sequence[str] | None = None) -> int:
    if args.worker:
        return worker_main(args.worker)
    if args.natural:
        return run_natural(args, argv)
    lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    methods = ["split"] if args.allocators else args.methods
    allocators = args.allocators or [args.allocator]
    out_dir = args.out or Path("bench_results") / time.strftime("orpo-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bench-orpo-") as scratch:
        model = args.model
        if args.quick:
            model = str(build_tiny_model_dir(Path(scratch) / "tiny-llama"))
            print(f"[bench] --quick: tiny random Llama built in {model}", file=sys.stderr)
        base = BenchSpec(
            method="split", max_length=lengths[0], model=model, quant=args.quant,
            compute_dtype=args.compute_dtype or ("float32" if args.quick else "auto"), device=args.device,
            allocator=allocators[0], chunk_size=args.chunk_size, beta=args.beta, steps=args.steps,
        )
        rows = run_benchmark(script, plan(lengths, methods, allocators, base), _print_row, args.timeout)
    model_name = "SmolLM2-135M-Instruct (embedded)" if args.model == EMBEDDED else args.model
    settings = {**asdict(base), "model": model_name if not args.quick else "tiny random Llama (--quick)",
                "lengths": lengths, "methods": methods, "allocators": allocators, "quick": args.quick,
                "machine": describe_machine(), "command": " ".join([Path(script).name if script else "qlora-orpo bench", *(argv or [])])}
    settings.pop("method"), settings.pop("max_length"), settings.pop("allocator")
    paths = write_report(rows, out_dir, settings)
    print(markdown_table(rows))
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


def run_natural(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--natural``: each configuration trains the same natural HH pairs in its own process."""
    out_dir = args.out or Path("bench_results") / time.strftime("natural-%Y%m%d-%H%M%S")
    steps = max(2, args.steps)  # the first step is reported apart, so at least one more
    rows = []
    from ..models.loader import select_device

    device = str(select_device(args.device))  # both tools train there
    for length in args.lengths or [512, 1024]:
        for method in args.natural:
            spec = NaturalSpec(method=method, max_length=length, steps=steps, model=args.model, beta=args.beta,
                               pack_tokens=args.pack_tokens, device=device)
            rows.append(run_in_subprocess(spec, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    settings = {"machine": describe_machine(), "command": " ".join(["qlora-orpo bench", *(argv or [])])}
    atomic_write_text(out_dir / "natural.json", json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out_dir / "natural.md", table + "\n")
    print(table)
    print(f"[bench] wrote {out_dir / 'natural.json'} and natural.md", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0
