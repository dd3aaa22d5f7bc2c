"""``qlora-orpo plan``: predicted peak memory of a training step, and the largest length and batch that fit."""

from __future__ import annotations

import argparse
from typing import Any

from .parsing import OneLineParser

DESCRIPTION = ("Predict the peak memory of a --step split training step from a model's config.json (a local "
               "directory or file, 'embedded', or a hub id): the analytic floor per part times the overhead the "
               "benchmark measured, with the float32 and the bf16 residual stream side by side; with --gpu-memory "
               "or --ram, the largest max_length and batch that fit.")
PARSER_KWARGS: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "allow_abbrev": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.plan import OVERHEAD

    # --model as train, eval and chat spell it; the positional form stays as an alias.
    parser.add_argument("model_positional", nargs="?", metavar="MODEL", help="the same as --model")
    parser.add_argument("--model", help="model directory, its config.json, 'embedded', or a hub id (owner/name)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per side (prompt + response)")
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per micro-batch")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", type=float, metavar="GIB", help="GPU memory to fit in, GiB")
    budget.add_argument("--ram", type=float, metavar="GIB", help="CPU memory to fit in, GiB (a CPU run)")
    parser.add_argument("--reserve", type=float, default=0.5, metavar="GIB",
                        help="memory of the process outside the model (CUDA context, Python and torch libraries)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (every linear layer)")
    parser.add_argument("--logits-chunk-size", type=int, default=64, help="scored positions per lm_head call")
    parser.add_argument("--overhead", type=float, default=round(OVERHEAD, 3),
                        help="measured / floor factor applied to the step (default: the benchmark's)")


def build_parser(prog: str = "qlora-orpo plan") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..models.plan import model_shape, read_model_config, render

    if args.model and args.model_positional and args.model != args.model_positional:
        parser.error(f"the model is given twice: {args.model_positional!r} and --model {args.model!r}")
    args.model = args.model or args.model_positional
    if not args.model:
        parser.error("a model is required: --model DIR (or the positional MODEL)")
    for name in ("max_length", "batch_size", "lora_r", "logits_chunk_size"):
        if getattr(args, name) < (2 if name == "max_length" else 1):
            parser.error(f"--{name.replace('_', '-')}: {getattr(args, name)} is too small")
    if args.overhead < 1 or args.reserve < 0:
        parser.error("--overhead must be >= 1 and --reserve >= 0")
    config, source = read_model_config(args.model)
    shape = model_shape(config, source)
    budget = args.gpu_memory if args.gpu_memory is not None else args.ram
    kind = "GPU memory" if args.gpu_memory is not None else "RAM"
    print(render(args.model, shape, args.max_length, args.batch_size, budget, kind, lora_r=args.lora_r,
                 chunk_size=args.logits_chunk_size, overhead=args.overhead, reserve_gib=args.reserve))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..core.errors import command

    parser = build_parser()
    return command(lambda: run(parser.parse_args(argv), parser))()
