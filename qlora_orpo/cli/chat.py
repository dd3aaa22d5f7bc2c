"""``qlora-orpo chat``: generate replies from an adapter on its base, or from a model directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import command
from .parsing import OneLineParser

DESCRIPTION = ("Generate replies with the chat template from an adapter on its base, or from a model "
               "directory. Prompts come from --prompt, else one per line of stdin until EOF.")
PARSER_KWARGS: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "allow_abbrev": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="Adapter directory; its card names the base, whose fingerprint is checked.")
    which.add_argument("--model", help="Model directory (e.g. a merged export), 'embedded' or a hub id.")
    parser.add_argument("--base", help="With --adapter: the base to load instead of the card's.")
    parser.add_argument("--force", action="store_true", help="Load the adapter even if the base's fingerprint differs.")
    parser.add_argument("--compare", action="store_true", help="With --adapter: also print the base's reply.")
    parser.add_argument("--prompt", action="append", help="A prompt (repeatable). Default: read stdin lines.")
    parser.add_argument("--system", help="A system message before each prompt (default: the adapter's --system-prompt).")
    parser.add_argument("--quant", choices=("none", "nf4"), default="none", help="Load the base float32 or 4-bit.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Longest reply in tokens.")
    parser.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=None, help="With --sample (default 0.7).")
    parser.add_argument("--top-p", type=float, default=None, help="With --sample: nucleus mass (default 0.9).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for --sample.")


def build_parser(prog: str = "qlora-orpo chat") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from ..recipes import chat as C

    if not args.sample and (args.temperature is not None or args.top_p is not None):
        parser.error("--temperature and --top-p apply only with --sample")
    if args.model and (args.base or args.compare):
        parser.error("--base and --compare apply only with --adapter")
    defaults = C.GenerationSettings()
    settings = C.GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature if args.temperature is not None else defaults.temperature,
        top_p=args.top_p if args.top_p is not None else defaults.top_p,
    )
    model, tokenizer = C.load_for_chat(
        args.adapter, args.model, base=args.base, quant=args.quant, device=args.device, force=args.force
    )
    torch.manual_seed(args.seed)
    prompts = args.prompt or C.read_prompts(sys.stdin, interactive=sys.stdin.isatty())
    system = args.system
    if system is None and args.adapter:  # the system prompt the adapter was trained with, as its card records
        from ..export.adapters import read_adapter

        card = read_adapter(args.adapter, require_card=False).card or {}
        system = (card.get("qlora_orpo", {}).get("training") or {}).get("system_prompt") or None
    C.chat(model, tokenizer, prompts, settings, system=system, compare=args.compare)
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
