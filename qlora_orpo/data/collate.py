"""Batches of tokenised preference pairs: right padding, labels, the joint (concatenated) batch.

Text to token ids is ``templating.py``'s job. Chosen and rejected sides are padded
separately, never to each other's length: the split step runs them one after the other,
and padding one to the other's length would waste compute and memory on the shorter side.
Labels cover the response tokens only (``IGNORE_INDEX`` on the prompt and on padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label of a token no loss is taken on (prompt, padding): torch's cross-entropy default


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
    pairs: tuple[TokenizedPair, ...] = ()  # the pairs themselves, for the shared layout (``packing.py``)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.chosen.to(device), self.rejected.to(device), self.rows, self.pairs)

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
    return PairBatch(chosen, rejected, [it.row for it in items], tuple(items))


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
