"""Tokenisation of preference pairs and padding into batches.

Rules (each tested in ``tests/test_collate.py``):

* The prompt is rendered with the tokenizer's chat template and the generation prompt
  (``add_generation_prompt=True``) when the tokenizer has a template; otherwise as plain
  text (a single user message is used as is; a conversation as ``User: …``/``Assistant: …``
  turns ending in ``Assistant:``).
* A response is its text's tokens followed by EOS, so the model learns to stop. Chosen and
  rejected share one tokenisation of the prompt, so their prompt tokens are identical.
* Labels cover the response tokens only (``IGNORE_INDEX`` on the prompt and on padding).
* Truncation: the prompt loses its oldest tokens down to ``max_prompt_length``; then each
  response is cut to fit ``max_length`` (a cut response loses its EOS, since it did not end
  there). A pair whose chosen or rejected response keeps no text token is dropped and
  counted, never trained on.
* Chosen and rejected sides are padded separately, never to each other's length: the split
  step runs them one after the other, and padding one to the other's length would waste
  compute and memory on the shorter side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .loss import IGNORE_INDEX

if TYPE_CHECKING:  # annotations only: collate works on any object with these fields
    from .data import Message, PreferencePair

_PLAIN_ROLE = {"user": "User", "assistant": "Assistant", "system": "System"}


@dataclass(frozen=True)
class TokenizedPair:
    """One pair as token ids; ``chosen_ids``/``rejected_ids`` are the response tokens only."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row: int
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens processed for this pair (both sides, prompt counted twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeStats:
    """What tokenisation kept, cut and dropped, for the dry run and the run log."""

    kept: int = 0
    dropped_rows: list[int] = field(default_factory=list)
    truncated_prompt: int = 0
    truncated_response: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    sequence_lengths: list[int] = field(default_factory=list)  # prompt + longer response, before truncation

    @property
    def truncated(self) -> int:
        return self.truncated_prompt + self.truncated_response


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: Sequence[Message]) -> str:
    """The prompt text that precedes the response, ending where the assistant starts speaking."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{_PLAIN_ROLE.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_pair(
    pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int
) -> tuple[TokenizedPair | None, dict[str, int]]:
    """Tokenise and truncate one pair. Returns ``(None, info)`` when it must be dropped.

    ``info`` holds the untruncated lengths and which parts were cut, for the statistics.
    """
    templated = has_chat_template(tokenizer)
    prompt_text = render_prompt(tokenizer, pair.prompt)
    # The chat template writes its own special tokens as text; plain text gets the
    # tokenizer's usual BOS (if it has one).
    prompt_ids = _encode(tokenizer, prompt_text, add_special_tokens=not templated)
    separator = "" if templated or (len(pair.prompt) == 1 and pair.prompt[0]["role"] == "user") else " "
    responses = [
        _encode(tokenizer, separator + text, add_special_tokens=False) + [tokenizer.eos_token_id]
        for text in (pair.chosen, pair.rejected)
    ]
    info = {
        "prompt_length": len(prompt_ids),
        "sequence_length": len(prompt_ids) + max(len(r) for r in responses),
        "truncated_prompt": 0,
        "truncated_response": 0,
    }
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
        info["truncated_prompt"] = 1
    budget = max_length - len(prompt_ids)
    cut = []
    for i, ids in enumerate(responses):
        if len(ids) > budget:
            cut.append(ids[:budget])
            info["truncated_response"] = 1
        else:
            cut.append(ids)
        # A response with no text token left (only EOS, or nothing) teaches nothing.
        if not any(t != tokenizer.eos_token_id for t in cut[i]):
            return None, info
    tokenized = TokenizedPair(
        prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(cut[0]),
        rejected_ids=tuple(cut[1]),
        row=pair.row,
        truncated=bool(info["truncated_prompt"] or info["truncated_response"]),
    )
    return tokenized, info


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    progress: bool = True,
    description: str = "tokenising",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise every pair; dropped pairs are counted in the stats, never returned."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so responses cannot be terminated")
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    for pair in tqdm(pairs, desc=description, disable=not progress or None, unit="pair", leave=False):
        tokenized, info = tokenize_pair(pair, tokenizer, max_length, max_prompt_length)
        stats.prompt_lengths.append(info["prompt_length"])
        stats.sequence_lengths.append(info["sequence_length"])
        stats.truncated_prompt += info["truncated_prompt"]
        stats.truncated_response += info["truncated_response"]
        if tokenized is None:
            stats.dropped_rows.append(pair.row)
            continue
        stats.kept += 1
        out.append(tokenized)
    return out, stats


@dataclass
class SideBatch:
    """One side (chosen or rejected) of a batch of pairs, right-padded.

    Shapes: all ``(batch, seq)``. ``labels`` score the response only; ``prompt_labels`` also
    score the prompt (all real tokens), for the prompt-inclusive NLL option.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_labels: torch.Tensor

    def to(self, device: torch.device | str) -> SideBatch:
        return SideBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_labels)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class PairBatch:
    chosen: SideBatch
    rejected: SideBatch
    rows: list[int]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.chosen.to(device), self.rejected.to(device), self.rows)

    @property
    def size(self) -> int:
        return self.chosen.input_ids.shape[0]


def pad_side(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, multiple: int = 1
) -> SideBatch:
    """Right-pad ``(prompt_ids, response_ids)`` sequences into one :class:`SideBatch`.

    The width is rounded up to ``multiple``: fewer distinct shapes means fewer per-shape
    kernel caches (oneDNN on CPU) and better tensor-core tiles on GPU.
    """
    longest = max(len(p) + len(r) for p, r in sequences)
    length = -(-longest // multiple) * multiple
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    prompt_labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        ids = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        n, p = ids.numel(), len(prompt)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, p:n] = ids[p:]
        prompt_labels[i, :n] = ids
    return SideBatch(input_ids, attention_mask, labels, prompt_labels)


def collate_pairs(items: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int = 1) -> PairBatch:
    """Batch pairs: chosen and rejected padded separately (see the module docstring)."""
    chosen = pad_side([(it.prompt_ids, it.chosen_ids) for it in items], pad_token_id, pad_to_multiple_of)
    rejected = pad_side([(it.prompt_ids, it.rejected_ids) for it in items], pad_token_id, pad_to_multiple_of)
    return PairBatch(chosen, rejected, [it.row for it in items])


def concat_sides(batch: PairBatch, pad_token_id: int) -> SideBatch:
    """Chosen rows then rejected rows in one batch padded to the longest, as the peer (TRL) does."""
    width = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    fills = (pad_token_id, 0, IGNORE_INDEX, IGNORE_INDEX)
    parts = zip(
        (batch.chosen.input_ids, batch.chosen.attention_mask, batch.chosen.labels, batch.chosen.prompt_labels),
        (batch.rejected.input_ids, batch.rejected.attention_mask, batch.rejected.labels, batch.rejected.prompt_labels),
        fills,
        strict=True,
    )
    return SideBatch(*(torch.cat([widen(c, v), widen(r, v)]) for c, r, v in parts))
