"""Try a result: generate replies from an adapter on its base, or from a (merged) model directory.

``scripts/chat.py --adapter DIR`` loads the base the adapter's card names (the local path
trained from, else its ``--model`` value such as ``embedded``), checks the fingerprint, and
answers each prompt with the chat template; ``--compare`` also shows the base's own reply
(the adapter disabled), which is the quickest way to see what training changed.
``--model DIR`` chats with any model directory, e.g. a merged export.

The base is loaded unquantised in float32 by default (simplest, and fast enough for 135M on
a CPU), or in 4-bit with ``--quant nf4`` (embeddings stay float32, so the fingerprint still
matches). Decoding is greedy unless ``--sample``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import torch

from ..core.console import console_logger
from ..core.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerationSettings:
    """How to decode: greedy (``sample=False``) or nucleus sampling at ``temperature``/``top_p``."""

    max_new_tokens: int = 256
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if not self.temperature > 0:
            raise UserError(f"temperature: {self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: {self.top_p} must be in (0, 1]")


log = console_logger()


def load_for_chat(
    adapter: str | None = None,
    model: str | None = None,
    *,
    base: str | None = None,
    quant: str = "none",
    device: str = "auto",
    force: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model to chat with and its tokenizer: ``adapter`` on its base, or the model directory ``model``.

    ``base`` overrides the base named in the adapter's card. ``quant`` is ``"none"``
    (float32) or ``"nf4"``. The adapter's fingerprint check applies; ``force`` skips it with
    a warning. Returns a peft model for an adapter (``disable_adapter()`` gives the base).
    """
    from ..export.adapters import adapter_tokenizer_dir, load_adapter, read_adapter, resolve_base
    from ..models.loader import (
        load_base,
        load_tokenizer,
        resolve_compute_dtype,
        resolve_model_path,
        select_device,
    )

    if (adapter is None) == (model is None):
        raise UserError("give exactly one of --adapter and --model")
    if quant not in ("none", "nf4"):
        raise UserError(f"quant: {quant!r} is not one of none, nf4")
    if adapter is not None:
        info = read_adapter(adapter, require_card=not force)
        path = resolve_base(info, base)
    else:
        path = resolve_model_path(model)
    target = select_device(device)
    # An adapter trained with --chat-template carries its tokenizer (and template): chat in that format.
    tokenizer = load_tokenizer((adapter is not None and adapter_tokenizer_dir(adapter)) or path)
    # Unquantised: float32 (simplest, fast enough for small models on a CPU). 4-bit: the
    # same layers as training; embeddings stay float32 on the CPU, so the fingerprint matches.
    compute = resolve_compute_dtype("auto", target) if quant == "nf4" else torch.float32
    loaded = load_base(path, quant, target, compute, dtype=torch.float32)
    if adapter is not None:
        loaded = load_adapter(loaded, tokenizer, adapter, force=force)
    loaded.eval()
    what = f"{adapter} on {path}" if adapter is not None else path
    log(f"chat: {what} ({'nf4 4-bit' if quant == 'nf4' else 'float32'} on {target})")
    return loaded, tokenizer


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


@torch.no_grad()
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    settings: GenerationSettings | None = None,
) -> str:
    """The assistant's reply to ``messages`` (rendered with the chat template, generation prompt added)."""
    from ..data.templating import encode_prompt, generation_config

    settings = settings or GenerationSettings()
    device = next(model.parameters()).device
    input_ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.sample else {}
    config = generation_config(tokenizer, settings.max_new_tokens, **sampling)
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
    )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def read_prompts(stream: TextIO, interactive: bool) -> Iterator[str]:
    """Non-empty lines of ``stream`` until EOF; shows a ``> `` prompt on stderr when interactive."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Iterable[str],
    settings: GenerationSettings | None = None,
    *,
    system: str | None = None,
    compare: bool = False,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Answer each prompt (single turn); with ``compare``, also the base's reply (adapter disabled).

    Writes the replies to ``out`` (stdout) as they come and returns them as dicts
    ``{"prompt", "reply"[, "base_reply"]}``.
    """
    out = out or sys.stdout
    if compare and not hasattr(model, "disable_adapter"):
        raise UserError("--compare needs --adapter (a model directory has no adapter to switch off)")
    results = []
    for prompt in prompts:
        messages = chat_messages(prompt, system)
        record = {"prompt": prompt}
        if compare:
            with model.disable_adapter():
                record["base_reply"] = generate_reply(model, tokenizer, messages, settings)
            record["reply"] = generate_reply(model, tokenizer, messages, settings)
            print(f"[base]    {record['base_reply']}\n[adapter] {record['reply']}\n", file=out, flush=True)
        else:
            record["reply"] = generate_reply(model, tokenizer, messages, settings)
            print(record["reply"] + "\n", file=out, flush=True)
        results.append(record)
    return results
