"""What identifies a base model: the fingerprint an adapter's card records and every load checks.

The fields, checked in this order (the first ones are cheap and explain most mismatches):
``architecture``, ``vocab_size``, ``hidden_size``, ``num_layers``, ``tokenizer_sha256`` (the
sorted vocabulary) and ``embeddings_sha256`` (the float32 bytes of the input embedding
matrix). The embeddings are the one large tensor that a 4-bit load and a full-precision load
share (bitsandbytes quantises only the linear layers), so the training-time fingerprint of a
4-bit base equals that of the same checkpoint loaded in float32 for chat or export. A model
whose embeddings were loaded in 16 bits (training in bfloat16) hashes its checkpoint's own
tensor instead, read from its safetensors file, so its card still matches float32 loads.

``layers_sha256`` (issue 20) hashes the weights of every linear layer of the first decoder
block. LoRA never changes the embeddings, so they alone cannot tell a base from a model into
which an adapter was merged; the merge changes the linear layers it targets, and every
target list (``all-linear``, attention only, MLP only) has one in each block. Quantised,
16-bit or sharded weights are read from the checkpoint file, as the embeddings are, so the
field is the same for 4-bit, bfloat16 and float32 loads. A card written before the field
existed does not hold it, and is not checked on it (:data:`OPTIONAL_FIELDS`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

FINGERPRINT_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "tokenizer_sha256",
    "embeddings_sha256",
    "layers_sha256",
)
# Checked only when both sides hold a value: absent from older cards; None where the weights
# cannot be read (a quantised model whose checkpoint file is gone).
OPTIONAL_FIELDS = ("layers_sha256",)


def fingerprint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What identifies a base model, whether loaded 4-bit, float32 or wrapped by peft.

    Returns ``{architecture, vocab_size, hidden_size, num_layers, tokenizer_sha256,
    embeddings_sha256, layers_sha256}``. ``embeddings_sha256`` hashes the shape and the float32 bytes of
    ``get_input_embeddings().weight`` (``(vocab, hidden)``; about 0.3 s for 49152 x 576);
    a model loaded in 16 bits hashes its checkpoint's tensor instead, when it can be read.
    ``tokenizer_sha256`` hashes the vocabulary (``get_vocab()``, added tokens included) as a
    JSON list of ``[token, id]`` sorted by token.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    weight = model.get_input_embeddings().weight.detach()
    if weight.dtype != torch.float32:
        # A 16-bit load of a float32 checkpoint has other bytes: hash the checkpoint's own
        # tensor, so that a card written from a bfloat16 training model matches float32 loads.
        stored = _checkpoint_tensor(base, weight)
        weight = weight if stored is None else stored
    # A copy: numpy() makes a tensor's storage non-resizable for good, and FSDP2 frees the
    # embeddings it gathered (a sharded run's fingerprint) by resizing their storage to 0.
    embeddings = weight.to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    digest = hashlib.sha256(f"{tuple(embeddings.shape)}".encode())
    digest.update(embeddings.numpy().tobytes())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False, separators=(",", ":"))
    return {
        "architecture": type(base).__name__,
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "tokenizer_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
        "embeddings_sha256": digest.hexdigest(),
        "layers_sha256": _layers_sha256(base),
    }


def _plain_name(name: str) -> str:
    """A parameter's name as its checkpoint stores it: without peft's wrapper prefixes."""
    name = name.replace(".base_layer.", ".")
    return name.removeprefix("base_model.model.")


def _layers_sha256(model: torch.nn.Module) -> str | None:
    """sha256 of the float32 weights of the first decoder block's linear layers (see the module docstring)."""
    import torch

    linear = [(_plain_name(f"{n}.weight"), m.weight) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n and ".lora_" not in n]
    block = next((re.match(r"^(.*?\.\d+)\.", name) for name, _ in linear if re.match(r"^(.*?\.\d+)\.", name)), None)
    if block is None:
        return None
    digest = hashlib.sha256()
    for name, weight in sorted((n, w) for n, w in linear if n.startswith(block.group(1) + ".")):
        tensor = weight.detach()
        if tensor.dtype != torch.float32 or type(tensor) is not torch.Tensor:
            # 4-bit (packed uint8), 16-bit or an FSDP2 shard: the checkpoint's own tensor.
            tensor = _stored_tensor(model, name)
            if tensor is None:
                return None
        tensor = tensor.to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _stored_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``name`` in the safetensors checkpoint ``model`` was loaded from, or None."""
    from safetensors import safe_open

    directory = Path(str(getattr(model, "name_or_path", "") or ""))
    if not directory.is_dir():
        return None
    index = directory / "model.safetensors.index.json"
    try:
        file = json.loads(index.read_text())["weight_map"].get(name) if index.is_file() else "model.safetensors"
        if file is None or not (directory / file).is_file():
            return None
        with safe_open(str(directory / file), framework="pt") as handle:
            return handle.get_tensor(name) if name in handle.keys() else None  # noqa: SIM118
    except (OSError, ValueError, KeyError):
        return None


def _checkpoint_tensor(model: torch.nn.Module, parameter: torch.Tensor) -> torch.Tensor | None:
    """``parameter`` as stored in the safetensors checkpoint ``model`` was loaded from, or None."""
    name = next((n for n, p in model.named_parameters() if p is parameter or p.data_ptr() == parameter.data_ptr()), None)
    return None if name is None else _stored_tensor(model, name)


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The fingerprint fields (in :data:`FINGERPRINT_FIELDS` order) whose values differ."""
    return [name for name in FINGERPRINT_FIELDS if expected.get(name) != actual.get(name)
            and not (name in OPTIONAL_FIELDS and (expected.get(name) is None or actual.get(name) is None))]


def describe_differences(expected: dict[str, Any], actual: dict[str, Any], fields: list[str]) -> str:
    parts = []
    for name in fields:
        want, have = expected.get(name), actual.get(name)
        if name.endswith("_sha256"):  # 64 hex digits say nothing to a reader; 12 identify them
            want, have = str(want)[:12], str(have)[:12]
        parts.append(f"{name} {want} (adapter) vs {have} (this base)")
    return "; ".join(parts)
