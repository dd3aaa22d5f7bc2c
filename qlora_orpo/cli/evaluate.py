"""``qlora-orpo eval``: held-out preference metrics of a base model and base + adapter, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import command
from ..core.files import atomic_write_text
from .parsing import OneLineParser

DESCRIPTION = ("Held-out preference metrics of a base model and base + adapter, side by side. Settings "
               "default to the adapter's training config (its card), so the held-out split is the one training held out.")
PARSER_KWARGS: dict[str, Any] = {
    "formatter_class": argparse.ArgumentDefaultsHelpFormatter,
    "argument_default": argparse.SUPPRESS,
    "allow_abbrev": False,
}
ACTION_ARGS = ("adapter", "config", "force", "json_out", "progress", "show_replies", "markdown_out", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--adapter", default=None, help="adapter directory (a run's adapter/); without it only the base is evaluated")
    add("--model", dest="model", help="base model: 'embedded' or a directory (default: the adapter's base)")
    add("--config", default=None, help="YAML/JSON config file (e.g. a run's config.yaml); flags override it")
    add("--data", dest="data", nargs="+", help="preference data (as qlora-orpo train --data)")
    add("--eval-fraction", dest="eval_fraction", type=float, help="share held out, as in training")
    add("--test", action="store_true", default=False,
        help="evaluate on the run's test split (the test_fraction share of --data) instead of the held-out split")
    add("--test-fraction", dest="test_fraction", type=float, help="the test split's share, as in training")
    add("--eval-data", dest="eval_data", nargs="+",
        help="evaluate on this data instead of a held-out share of --data (every form --data takes)")
    add("--max-pairs", "--eval-max-pairs", dest="eval_max_pairs", type=int,
        help="evaluate at most N pairs (default: every held-out pair, whatever the run capped)")
    add("--chat-template", dest="chat_template",
        help="chat template name or jinja file (an adapter trained with --chat-template uses the one it saved)")
    add("--system-prompt", dest="system_prompt", help="system turn for prompts without one (default: as trained)")
    add("--max-length", dest="max_length", type=int, help="max tokens of prompt + response")
    add("--max-prompt-length", dest="max_prompt_length", type=int, help="max prompt tokens")
    add("--beta", dest="beta", type=float, help="beta of the loss and of the reward margin")
    add("--nll-over-prompt", dest="nll_over_prompt", action=argparse.BooleanOptionalAction,
        help="chosen NLL over prompt + response instead of the response")
    add("--batch-size", "--eval-batch-size", dest="eval_batch_size", type=int, help="pairs per batch")
    add("--logits-chunk-size", dest="logits_chunk_size", type=int, help="positions per lm_head chunk")
    add("--quant", dest="quant", choices=("nf4", "fp4", "none"), help="base quantisation (default: as trained)")
    add("--compute-dtype", dest="compute_dtype", choices=("auto", "bfloat16", "float16", "float32"))
    add("--device", dest="device", help="auto, cpu, cuda or cuda:N")
    add("--force", action="store_true", default=False, help="load the adapter even if the base's fingerprint differs")
    add("--json", dest="json_out", default=None, help="write the results as JSON to this file ('-' for stdout)")
    add("--no-progress", dest="progress", action="store_false", default=True, help="no progress bar")
    # Generation health (health.py): greedy replies to held-out prompts, base vs adapter.
    add("--health-prompts", dest="health_prompts", type=int, help="held-out prompts for generation health (0 = none)")
    add("--max-new-tokens", dest="health_max_new_tokens", type=int, help="longest greedy reply for generation health")
    add("--show-replies", dest="show_replies", type=int, default=3, help="replies shown side by side in the report")
    add("--markdown", dest="markdown_out", default=None, help="also write the markdown report to this file")


def build_parser(prog: str = "qlora-orpo eval") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def run(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A markdown table on stdout, JSON with ``--json``."""
    from ..evaluation.report import markdown_report
    from ..recipes.evaluate import resolve_eval_config, run_evaluation

    args = vars(namespace)
    actions = {name: args.pop(name) for name in ACTION_ARGS}
    cfg = resolve_eval_config(actions["adapter"], actions["config"], args)
    if actions["adapter"] is not None and "model" not in args:
        from ..export.adapters import read_adapter, resolve_base

        info = read_adapter(actions["adapter"], require_card=not actions["force"])
        if info.card is not None:
            cfg.model = resolve_base(info)  # the card's base: the path trained from, else its name
    result = run_evaluation(cfg, actions["adapter"], actions["force"], actions["progress"], actions["test"])
    table = markdown_report(result, actions["show_replies"])
    if actions["markdown_out"]:
        atomic_write_text(Path(actions["markdown_out"]), table + "\n")
    text = json.dumps(result, indent=2)
    if actions["json_out"] == "-":
        print(table, file=sys.stderr)
        print(text)
    else:
        print(table)
        if actions["json_out"]:
            atomic_write_text(Path(actions["json_out"]), text + "\n")
    return 0


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
