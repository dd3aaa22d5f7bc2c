"""Builders shared by the tests of issue 22's features: a tiny saved model, preference files in several shapes.

Kept out of ``conftest.py`` so these tests own their fixtures; everything is built in-process in
milliseconds, nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import build_tiny_llama, build_tokenizer

WORDS = "the quick brown fox jumps over lazy dog hello world capital France Paris bread flour water".split()


def save_tiny_model(path: Path, chat_template: bool = True) -> Path:
    """A tiny random Llama with the byte-level test tokenizer (with or without its chat template) at ``path``."""
    tokenizer = build_tokenizer(chat_template=chat_template)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pair_rows(n: int, seed: int = 0, fields: tuple[str, str, str] = ("prompt", "chosen", "rejected")) -> list[dict]:
    """``n`` prompt/chosen/rejected rows with a learnable preference, under the column names ``fields``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=g)]
        values = (" ".join(words[:3]), "hello world " + " ".join(words[3:6]), "the lazy dog " + " ".join(words[5:8]))
        rows.append(dict(zip(fields, values, strict=True)))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_flags(model_dir: Path, data: Path | str, out: Path, run_name: str = "t") -> list[str]:
    """The flags of a one-second CPU training run on the tiny model."""
    return ["--model", str(model_dir), "--data", str(data), "--quant", "none", "--compute-dtype", "float32",
            "--device", "cpu", "--max-length", "48", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--logits-chunk-size", "8", "--batch-size", "2", "--grad-accum", "1", "--learning-rate", "1e-2",
            "--health-prompts", "0", "--output-dir", str(out), "--run-name", run_name]
