"""``qlora-orpo export``: merge an adapter into its unquantised base, verified with plain transformers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import GGUF_QUANTS
from ..core.errors import command
from .parsing import OneLineParser

DESCRIPTION = ("Merge a LoRA adapter into its unquantised base and write a plain transformers directory "
               "(--format merged) or one GGUF file with an Ollama Modelfile (--format gguf; without --adapter, "
               "the --model alone), verified with plain transformers; or write the adapter as llama.cpp's LoRA "
               "GGUF with a Modelfile FROM the base GGUF (--format gguf-lora).")
PARSER_KWARGS: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "allow_abbrev": False}
DTYPES = ("float32", "bfloat16", "float16")  # export.DTYPES' keys, without importing torch for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, help="Adapter directory (a run's adapter/ or adapters/<name>); "
                        "required except for --format gguf of a base alone.")
    parser.add_argument("--out", required=True, help="Output directory (absent, empty, or an earlier export); "
                        "for gguf a .gguf file name, or a directory that gets model-<quant>.gguf.")
    parser.add_argument("--format", choices=("merged", "gguf", "gguf-lora"), default="merged",
                        help="merged: safetensors directory; gguf: one .gguf file for llama.cpp/LM Studio/Ollama; "
                        "gguf-lora: the adapter alone as llama.cpp's LoRA GGUF (--lora, Ollama ADAPTER), in F32; "
                        "--quant is then the base GGUF's.")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored weights (merged only).")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16",
                        help="GGUF type of the matrices; norms stay F32; q4_k_m etc. pick a type per tensor as "
                        "llama.cpp's llama-quantize does (gguf only).")
    parser.add_argument("--base", default=None,
                        help="Base model to merge into (directory, 'embedded' or hub id); default: the card's.")
    parser.add_argument("--force", action="store_true", help="Merge even if the base's fingerprint differs.")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard, e.g. 500MB.")
    parser.add_argument("--model", dest="base", default=None, help="Same as --base; with --format gguf and no "
                        "--adapter, the model to export alone (the base GGUF a gguf-lora adapter runs on).")
    parser.add_argument("--base-gguf", default=None, help="gguf-lora: the base's GGUF, already written "
                        "(--format gguf --model BASE); default: write base-<quant>.gguf beside the adapter file.")


def build_parser(prog: str = "qlora-orpo export") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION, **PARSER_KWARGS)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..export.merged import export_merged

    if args.adapter is None and not (args.format == "gguf" and args.base):
        parser.error(f"--format {args.format} needs --adapter" + (" (or --model to export a base alone)"
                                                                  if args.format == "gguf" else ""))
    if args.format == "gguf-lora":
        from ..export.gguf_lora import export_gguf_lora

        result = export_gguf_lora(args.adapter, args.out, base=args.base, base_gguf=args.base_gguf,
                                  base_quant=args.quant, force=args.force)
        print(json.dumps(result.to_dict()))
        return 0
    if args.format == "gguf":
        from ..export.gguf import export_gguf

        print(json.dumps(export_gguf(args.adapter, args.out, args.quant, base=args.base, force=args.force).to_dict()))
        return 0
    result = export_merged(
        args.adapter, args.out, args.dtype, base=args.base, force=args.force, max_shard_size=args.max_shard_size
    )
    print(json.dumps(result.to_dict()))
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
