"""Command-line flags generated from :class:`~qlora_orpo.config.OrpoConfig`.

Each config field becomes one kebab-case flag (``max_steps`` -> ``--max-steps``) with the
field's help text; booleans get ``--flag/--no-flag``. Precedence: defaults < ``--config``
file < flags given on the command line. Flags that the user did not give stay out of the
parsed namespace (``argparse.SUPPRESS``), so a file value is only overridden on purpose.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from typing import Any

from .config import OrpoConfig
from .errors import command

# Flags that are actions of this invocation, not part of the recorded config.
ACTION_FLAGS = ("config", "dry_run", "resume", "show_examples")


def build_parser(prog: str = "finetune.py", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or "ORPO fine-tuning of a 4-bit quantised base model with LoRA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a mistyped prefix must not silently match another flag
    )
    parser.add_argument("--config", help="YAML or JSON file of config values; flags override it.")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Load the config, data and tokenizer, print what would be trained on, and exit.",
    )
    parser.add_argument(
        "--show-examples",
        type=int,
        metavar="N",
        help="With --dry-run: print the first N tokenised training pairs as text, each reply's trained "
        "(labelled) span between [[ and ]], closing tokens included.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the run named by --run-name (or the newest run in --output-dir) from its last checkpoint.",
    )
    group = parser.add_argument_group("config (each also settable in --config)")
    for f in fields(OrpoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "") + f" (default: {default!r})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(
                flag,
                dest=f.name,
                type=type(default),
                choices=f.metadata.get("choices"),
                help=help_text,
                metavar=f.name.upper() if not f.metadata.get("choices") else None,
            )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[OrpoConfig, dict[str, Any]]:
    """Parse ``argv`` into the resolved config and the action flags (``config``, ``dry_run``, ``resume``)."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
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
    return OrpoConfig.from_dict(values, source=actions["config"] or "command line"), actions


def _runs_on_cpu(cfg: OrpoConfig) -> bool:
    from .model import select_device

    return select_device(cfg.device).type == "cpu"


@command
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/finetune.py``: one-line errors, no tracebacks for user mistakes."""
    cfg, actions = parse_args(argv)
    if argv is None and not actions["dry_run"] and _runs_on_cpu(cfg):
        # A real command line (not a test calling main([...])): mimalloc or jemalloc must be preloaded
        # at process start, so this may re-execute the script under it.
        from .memory import reexec_with_allocator

        reexec_with_allocator(cfg.cpu_allocator, sys.argv)
    if actions["dry_run"]:
        from .dry_run import dry_run

        return dry_run(cfg, show_examples=actions["show_examples"])
    from .train import run

    run(cfg, resume=actions["resume"])
    return 0

