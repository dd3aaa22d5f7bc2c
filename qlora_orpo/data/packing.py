"""The prompt-shared, packed layout of a micro-batch: each prompt once, several pairs per row.

A pair's chosen and rejected sequences start with the same prompt, so the usual layout (two
sequences, ``collate.py``) runs the prompt twice. Here each pair is laid out once as

    [prompt | chosen reply | rejected reply]

with the rejected reply's position ids continuing from the prompt's end, as if the chosen reply
were not there, and pairs follow each other in a row up to ``pack_tokens`` tokens (no padding
between them; rows are right-padded to the longest row). What each token may attend to is
decided by :class:`SharedBatch`'s ``segment``, ``span`` and ``position_ids`` (the mask itself
is built on the device by ``training/shared.py``): causal within a pair, the rejected reply
never sees the chosen one, no token sees another pair's.

Scoring is by explicit positions: ``*_source[k]`` is the flat ``row * width + column`` index of
the hidden state that predicts ``*_target[k]``, and ``*_pair[k]`` the pair it belongs to. The
first token of each reply is predicted from the last prompt token (the seam the rejected reply
would otherwise get wrong: in the row, the token before it is the chosen reply's last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .collate import TokenizedPair

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


@dataclass
class SharedBatch:
    """A micro-batch in the shared layout. Row tensors are ``(rows, width)``; scoring tensors ``(n,)``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor  # the position inside its own sequence (prompt + that reply)
    segment: torch.Tensor  # the pair index within the micro-batch; -1 on padding
    span: torch.Tensor  # PROMPT, CHOSEN, REJECTED or PADDING
    chosen_source: torch.Tensor
    chosen_target: torch.Tensor
    chosen_pair: torch.Tensor
    rejected_source: torch.Tensor
    rejected_target: torch.Tensor
    rejected_pair: torch.Tensor
    prompt_source: torch.Tensor  # the prompt's own tokens (positions 1..p-1): for nll_over_prompt
    prompt_target: torch.Tensor
    prompt_pair: torch.Tensor
    num_pairs: int

    def to(self, device: torch.device | str) -> SharedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SharedBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @property
    def num_tokens(self) -> int:
        """Tokens in the rows (each prompt once), padding excluded."""
        return int((self.segment >= 0).sum())


def shared_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def assign_rows(pairs: Sequence[TokenizedPair], pack_tokens: int) -> list[list[int]]:
    """Pair indices per row, in order: a row takes the next pair while it stays within ``pack_tokens``.

    A pair longer than ``pack_tokens`` gets a row of its own; ``pack_tokens <= 0`` puts every
    pair in one row.
    """
    rows: list[list[int]] = []
    used = 0
    for index, pair in enumerate(pairs):
        length = shared_length(pair)
        if rows and (pack_tokens <= 0 or used + length <= pack_tokens):
            rows[-1].append(index)
            used += length
        else:
            rows.append([index])
            used = length
    return rows


def pack_shared(
    pairs: Sequence[TokenizedPair], pad_token_id: int, pack_tokens: int = 0, pad_to_multiple_of: int = 1
) -> SharedBatch:
    """Lay ``pairs`` out prompt-shared and packed into rows (see the module docstring)."""
    if not pairs:
        raise ValueError("pack_shared needs at least one pair")
    rows = assign_rows(pairs, pack_tokens)
    longest = max(sum(shared_length(pairs[i]) for i in row) for row in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    span = torch.full(shape, PADDING, dtype=torch.long)
    scored: dict[str, list[list[int]]] = {side: [[], [], []] for side in ("chosen", "rejected", "prompt")}

    def score(side: str, sources: range | list[int], targets: Sequence[int], pair: int) -> None:
        scored[side][0].extend(sources)
        scored[side][1].extend(targets)
        scored[side][2].extend([pair] * len(targets))

    for r, row in enumerate(rows):
        at = 0
        for index in row:
            pair = pairs[index]
            p, c, j = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            if p == 0 or c == 0 or j == 0:  # a reply's first token is predicted from the prompt's last
                raise ValueError(f"row {pair.row}: the shared layout needs a prompt and two replies")
            base = r * width + at
            ids = list(pair.prompt_ids) + list(pair.chosen_ids) + list(pair.rejected_ids)
            input_ids[r, at : at + p + c + j] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, at : at + p + c] = torch.arange(p + c)
            position_ids[r, at + p + c : at + p + c + j] = torch.arange(p, p + j)
            segment[r, at : at + p + c + j] = index
            span[r, at + p : at + p + c] = CHOSEN
            span[r, at : at + p] = PROMPT
            span[r, at + p + c : at + p + c + j] = REJECTED
            last_prompt = base + p - 1
            score("prompt", range(base, base + p - 1), pair.prompt_ids[1:], index)
            score("chosen", [last_prompt, *range(base + p, base + p + c - 1)], pair.chosen_ids, index)
            score("rejected", [last_prompt, *range(base + p + c, base + p + c + j - 1)], pair.rejected_ids, index)
            at += p + c + j

    def tensors(side: str) -> list[torch.Tensor]:
        return [torch.tensor(values, dtype=torch.long) for values in scored[side]]

    return SharedBatch(input_ids, position_ids, segment, span, *tensors("chosen"), *tensors("rejected"),
                       *tensors("prompt"), num_pairs=len(pairs))
