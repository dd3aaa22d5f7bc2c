"""``--model path/to/model.gguf``: a GGUF the user already has is a base, converted once into the cache.

A tiny Llama is written as an f32 GGUF by our own exporter (the shape Ollama's and LM Studio's
stores hold), then trained from with ``--model file.gguf``: the converted directory computes the
original model's logits, a second use converts nothing, and the adapter card records the file's
sha256. A file transformers cannot read is one line.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from test_gguf_lora import save_base
from transformers import AutoModelForCausalLM
from userfeatures import pair_rows, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.core.errors import ModelError
from qlora_orpo.export.adapters import parse_card
from qlora_orpo.models.loader import resolve_model_path


@pytest.fixture
def gguf_base(tmp_path, monkeypatch):
    from qlora_orpo.cli.export import main as export_main

    monkeypatch.setenv("QLORA_ORPO_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    base = save_base(tmp_path, model, tokenizer)
    out = tmp_path / "store" / "tiny.gguf"
    assert export_main(["--format", "gguf", "--model", str(base), "--out", str(out), "--quant", "f32"]) == 0
    return out, base


def test_a_gguf_file_is_converted_once_and_computes_the_original_logits(gguf_base, tmp_path):
    gguf, base = gguf_base
    converted = resolve_model_path(str(gguf))
    assert converted.startswith(str(tmp_path / "cache" / "gguf-tiny-"))
    marker = json.loads((tmp_path / "cache" / converted.split("/")[-1] / "qlora_orpo_source.json").read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    stamp = (tmp_path / "cache" / converted.split("/")[-1] / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(gguf)) == converted  # the second use converts nothing
    assert (tmp_path / "cache" / converted.split("/")[-1] / "model.safetensors").stat().st_mtime_ns == stamp
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # f32, q/k permutation undone


def test_training_from_a_gguf_records_its_sha256_in_the_card(gguf_base, tmp_path):
    gguf, _ = gguf_base
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    assert main(["train", *train_flags(gguf, data, tmp_path / "runs", "from-gguf"), "--max-steps", "1",
                 "--save-every", "0", "--eval-fraction", "0"]) == 0
    card = parse_card((tmp_path / "runs" / "from-gguf" / "adapter" / "README.md").read_text(), "README.md")
    base = card["qlora_orpo"]["base"]
    assert base["converted_from"]["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert base["model"] == "tiny.gguf"  # by name: a card leaks no local path


def test_a_file_transformers_cannot_read_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_ORPO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"broken.gguf: transformers cannot read this GGUF file") as err:
        resolve_model_path(str(bad))
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("gguf-")]  # nothing half-written
