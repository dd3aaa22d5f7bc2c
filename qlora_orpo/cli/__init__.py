"""``qlora-orpo``: one command with subcommands, as ``python -m qlora_orpo`` too.

Each subcommand lives in its own module of this package with the same four names:
``DESCRIPTION``, ``PARSER_KWARGS``, ``add_arguments(parser)`` and ``run(args, parser)``,
plus a ``main(argv)`` that parses with the module's own parser (what ``scripts/*.py`` and the
tests call). :func:`main` builds one argparse parser whose subparsers are those same parsers,
so ``qlora-orpo train --help`` and ``scripts/finetune.py --help`` list the same flags, all
generated from :class:`~qlora_orpo.config.OrpoConfig`. The library modules hold no argparse.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from ..core.errors import command
from .parsing import OneLineParser

# subcommand -> (module in this package, one-line summary for `qlora-orpo --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "ORPO fine-tuning of a 4-bit base with LoRA (flags from the config fields)"),
    "dry-run": ("train", "load config, data and tokenizer, say what would be trained on, and exit"),
    "eval": ("evaluate", "held-out preference metrics: base vs base + adapter"),
    "export": ("export", "merge an adapter into its base; verified with plain transformers"),
    "chat": ("chat", "generate replies from an adapter on its base, or a model directory"),
    "plot": ("plot", "redraw a run's training curves"),
    "bench": ("bench", "benchmark one ORPO step: memory, time, loss (TRL vs ours)"),
    "plan": ("plan", "predict a training step's peak memory from a config.json; largest length and batch that fit"),
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f".{SUBCOMMANDS[name][0]}", __name__)


def build_parser(prog: str = "qlora-orpo") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="ORPO preference fine-tuning of a 4-bit quantised base with LoRA, on a laptop CPU or one GPU.",
        allow_abbrev=False,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"qlora_orpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        module = _module(name)
        description = module.DRY_RUN_DESCRIPTION if name == "dry-run" else module.DESCRIPTION
        sub = subparsers.add_parser(name, help=summary, description=description, **module.PARSER_KWARGS)
        if name == "dry-run":
            module.add_arguments(sub, dry_run_command=True)
        else:
            module.add_arguments(sub)
    return parser


def _reexec_argv() -> list[str]:
    """How to start this same command again (the allocator re-exec): ``-m qlora_orpo`` stays ``-m``."""
    if sys.argv[0].endswith("__main__.py"):
        return ["-m", "qlora_orpo", *sys.argv[1:]]
    return list(sys.argv)


@command
def main(argv: list[str] | None = None) -> int:
    """``qlora-orpo COMMAND [flags]``: one-line errors, no tracebacks for user mistakes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.command
    del args.command
    subparser = parser._subparsers._group_actions[0].choices[name]  # the parser that parsed the flags
    module = _module(name)
    if module.__name__.endswith(".train"):
        return module.run(args, subparser, reexec_argv=_reexec_argv() if argv is None else None,
                          dry_run=name == "dry-run")
    return module.run(args, subparser)


def finetune_main(argv: list[str] | None = None) -> int:
    """``qlora-orpo-finetune``: the old name of ``qlora-orpo train`` (its ``--dry-run`` flag included)."""
    from .train import main as train_main

    return train_main(argv)
