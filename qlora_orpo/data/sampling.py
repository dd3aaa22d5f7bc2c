"""The order in which training sees its pairs: an endless, resumable stream of micro-batches."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .collate import PairBatch, TokenizedPair, collate_pairs


def micro_batches(
    pairs: list[TokenizedPair], batch_size: int, seed: int, start: int, pad_token_id: int, pad_to_multiple_of: int = 1,
    world_size: int = 1, rank: int = 0,
) -> Iterator[PairBatch]:
    """Endless stream of collated micro-batches, reshuffled each epoch from ``seed + epoch``.

    ``start`` skips that many micro-batches, so a resumed run sees exactly the batches it
    would have seen; the order depends only on (seed, epoch), never on earlier randomness.
    Under ``world_size`` ranks, ``start`` counts micro-batches of all ranks together and
    rank ``rank`` takes every ``world_size``-th of the one global stream, so a run can
    resume under another number of ranks (the pairs are then dealt out differently).
    """
    per_epoch = max(1, len(pairs) // batch_size)  # the short tail of an epoch is dropped
    index, epoch_of_order, order = start + rank, -1, []
    while True:
        epoch, position = divmod(index, per_epoch)
        if epoch != epoch_of_order:
            order = list(range(len(pairs)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            epoch_of_order = epoch
        chosen = [pairs[i] for i in order[position * batch_size : (position + 1) * batch_size]]
        yield collate_pairs(chosen, pad_token_id, pad_to_multiple_of)
        index += world_size
