"""``qlora-orpo train`` and ``dry-run``: flags generated from :class:`~qlora_orpo.config.OrpoConfig`.

Each config field becomes one kebab-case flag (``max_steps`` -> ``--max-steps``) with the
field's help text; booleans get ``--flag/--no-flag``. Precedence: defaults < ``--config``
file < flags given on the command line. Flags that the user did not give stay out of the
parsed namespace (``argparse.SUPPRESS``), so a file value is only overridden on purpose, and
``--resume`` knows exactly which fields the user asked to change.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from typing import Any

from ..config import OrpoConfig
from ..core.errors import command
from .parsing import OneLineParser

# Flags that are actions of this invocation, not part of the recorded config.
ACTION_FLAGS = ("config", "dry_run", "resume", "show_examples")
DESCRIPTION = "ORPO fine-tuning of a 4-bit quantised base model with LoRA."
DRY_RUN_DESCRIPTION = "Load the config, data and tokenizer, print what would be trained on, and exit."
PARSER_KWARGS: dict[str, Any] = {
    "formatter_class": argparse.ArgumentDefaultsHelpFormatter,
    "argument_default": argparse.SUPPRESS,
    "allow_abbrev": False,  # a mistyped prefix must not silently match another flag
}


def add_arguments(parser: argparse.ArgumentParser, dry_run_command: bool = False) -> None:
    parser.add_argument("--config", help="YAML or JSON file of config values (TRL names accepted); flags override it.")
    if not dry_run_command:
        parser.add_argument("--dry-run", action="store_true", help=DRY_RUN_DESCRIPTION)
    parser.add_argument(
        "--show-examples",
        type=int,
        metavar="N",
        help="With a dry run: print the first N tokenised training pairs as text, each reply's trained "
        "(labelled) span between [[ and ]], closing tokens included.",
    )
    if not dry_run_command:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="Continue the run named by --run-name (or the newest run in --output-dir) from its last "
            "checkpoint. Its recorded config is used; --max-steps, --epochs, --eval-every, --save-every, "
            "--log-every, --save-total-limit, --report-to and --export may change it.",
        )
    group = parser.add_argument_group("config (each also settable in --config)")
    for f in fields(OrpoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        # argparse %-formats help strings: a literal % in a field's help must be doubled.
        help_text = f.metadata.get("help", "").replace("%", "%%") + f" (default: {default!r})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif {"on", "off"} <= set(f.metadata.get("choices") or ()):
            # An on/off/auto switch that was a boolean: --flag alone is on, --no-flag is off.
            group.add_argument(flag, dest=f.name, nargs="?", const="on", choices=f.metadata["choices"], help=help_text)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off",
                               help=f"The same as {flag} off.")
        else:
            group.add_argument(
                flag,
                dest=f.name,
                type=type(default),
                choices=f.metadata.get("choices"),
                nargs=f.metadata.get("nargs"),
                help=help_text,
                metavar=f.name.upper() if not f.metadata.get("choices") else None,
            )


def build_parser(prog: str = "qlora-orpo train", description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description or DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def config_from_namespace(
    namespace: dict[str, Any], parser: argparse.ArgumentParser
) -> tuple[OrpoConfig, dict[str, Any], dict[str, Any]]:
    """The resolved config, the action flags, and the values the user set (file + flags)."""
    actions = {name: namespace.pop(name, None) for name in ACTION_FLAGS}
    actions["dry_run"] = bool(actions["dry_run"])
    actions["resume"] = bool(actions["resume"])
    actions["show_examples"] = int(actions["show_examples"] or 0)
    if actions["show_examples"] < 0:
        parser.error("--show-examples: N must be >= 0")
    values: dict[str, Any] = {}
    if actions["config"]:
        values.update(OrpoConfig.read_file(actions["config"]))
    values.update(namespace)  # only flags given explicitly are present
    cfg = OrpoConfig.from_dict(values, source=actions["config"] or "command line")
    return cfg, actions, values


def parse_args(argv: list[str] | None = None) -> tuple[OrpoConfig, dict[str, Any]]:
    """Parse ``argv`` into the resolved config and the action flags (``config``, ``dry_run``, ``resume``)."""
    parser = build_parser()
    cfg, actions, _ = config_from_namespace(vars(parser.parse_args(argv)), parser)
    return cfg, actions


def _runs_on_cpu(cfg: OrpoConfig) -> bool:
    from ..models.loader import select_device

    return select_device(cfg.device).type == "cpu"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, reexec_argv: list[str] | None = None,
        dry_run: bool = False) -> int:
    """Train (or dry-run) as the parsed flags say. ``reexec_argv``: how to restart this process under
    another allocator (a real command line only; a test calling ``main([...])`` passes None)."""
    cfg, actions, given = config_from_namespace(vars(args), parser)
    dry_run = dry_run or actions["dry_run"]
    if reexec_argv is not None and not dry_run and _runs_on_cpu(cfg):
        # mimalloc or jemalloc must be preloaded at process start, so this may re-execute the command.
        from ..models.memory import reexec_with_allocator

        reexec_with_allocator(cfg.cpu_allocator, reexec_argv)
    if dry_run:
        from ..recipes.dry_run import dry_run as describe

        return describe(cfg, show_examples=actions["show_examples"])
    from ..recipes.finetune import run as train

    train(cfg, resume=actions["resume"], overrides=given if actions["resume"] else None)
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    """``qlora-orpo-finetune`` and ``scripts/finetune.py``: ``qlora-orpo train`` with its ``--dry-run`` flag."""
    parser = build_parser(prog="finetune.py" if argv is None and sys.argv[0].endswith(".py") else "qlora-orpo train")
    return run(parser.parse_args(argv), parser, reexec_argv=sys.argv if argv is None else None)
