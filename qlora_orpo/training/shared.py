"""The forward of the prompt-shared layout (``data/packing.py``): one pass, every pair's two log-probs.

The decoder sees packed rows of ``[prompt | chosen | rejected]`` with a 4D additive attention
mask: causal within a pair, the rejected reply blind to the chosen one, no pair seeing another.
transformers takes a 4D mask as given (``masking_utils``: "already 4D ... custom") for eager
and SDPA attention alike; it infers packing from position ids only when no mask is given, so
the mask is always given. Masked entries hold the dtype's most negative value, not ``-inf``:
a padding row then softmaxes to something finite instead of NaN.

Sliding-window layers (Gemma-2/3, Qwen2 with its window on, Mistral v0.1, Phi-3) get the same
mask cut to the window, counted in positions inside the pair's own sequence (the rejected
reply's positions continue from the prompt), not in packed offsets. Models whose decoder takes
one mask per layer type (a dict, ``causal_mask_mapping`` in transformers) get a dict; the
others one tensor, windowed when the config has a window (they then window every layer).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ..data.packing import CHOSEN, REJECTED, SharedBatch
from .head import OutputHead, scored_logps


def allowed_attention(batch: SharedBatch, window: int | None = None) -> torch.Tensor:
    """``(rows, 1, width, width)`` bool: may query i attend to key j. Padding attends to itself only."""
    segment, span = batch.segment, batch.span
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    same_pair = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    rejected_sees_chosen = (span[:, :, None] == REJECTED) & (span[:, None, :] == CHOSEN)
    padding = (segment < 0)[:, :, None] & torch.eye(width, dtype=torch.bool, device=segment.device)
    allowed = ((same_pair & causal & ~rejected_sees_chosen) | padding)[:, None]
    return allowed if window is None else within_window(allowed, batch, window)


def within_window(allowed: torch.Tensor, batch: SharedBatch, window: int) -> torch.Tensor:
    """``allowed`` cut to keys fewer than ``window`` positions back (positions in the pair's own
    sequence, not packed offsets); a padding token's own position stays, so no row empties."""
    position = batch.position_ids
    return allowed & ((position[:, :, None] - position[:, None, :]) < window)[:, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative value elsewhere (what eager attention adds to the scores)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@functools.cache
def _takes_mask_per_layer_type(decoder_class: type) -> bool:
    """Whether the decoder's forward accepts a dict of masks keyed by layer type (transformers' convention)."""
    try:
        return "causal_mask_mapping" in inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):
        return False


def attention_mask_for(decoder: nn.Module, batch: SharedBatch, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask (or masks by layer type) the decoder is given for ``batch``.

    SDPA takes the boolean mask as is (a byte per entry); eager attention adds the mask to its
    scores, so it gets the additive form in the compute dtype.
    """
    config = decoder.config

    def form(allowed: torch.Tensor) -> torch.Tensor:
        return allowed if config._attn_implementation == "sdpa" else additive(allowed, dtype)

    window = getattr(config, "sliding_window", None)
    allowed = allowed_attention(batch)  # built once; the windowed mask is cut from it
    full = form(allowed)
    if _takes_mask_per_layer_type(type(decoder)):
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        masks = {"full_attention": full}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = full if window is None else form(within_window(allowed, batch, window))
        return masks
    return full if window is None else form(within_window(allowed, batch, window))


def shared_logps(
    model: nn.Module, batch: SharedBatch, chunk_size: int, nll_over_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen_logps, rejected_logps, chosen_nll)``, each ``(num_pairs,)``: what two per-side forwards give.

    ``logps`` are the mean log-probs over each reply's tokens; ``chosen_nll`` is ``-chosen_logps``,
    or with ``nll_over_prompt`` the mean NLL over the prompt's tokens (scored once) and the
    chosen reply's, the sequence the NLL is defined on.
    """
    head = OutputHead(model)
    decoder = head.base.get_decoder()
    dtype = decoder.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    mask = attention_mask_for(decoder, batch, dtype)
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                     use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    sides = [(batch.chosen_source, batch.chosen_target, batch.chosen_pair),
             (batch.rejected_source, batch.rejected_target, batch.rejected_pair)]
    if nll_over_prompt:
        sides.append((batch.prompt_source, batch.prompt_target, batch.prompt_pair))
    # One pass through the head for every scored token of every side (fewer, fuller chunks).
    sizes = [source.numel() for source, _, _ in sides]
    token_logps = scored_logps(flat[torch.cat([s for s, _, _ in sides])], torch.cat([t for _, t, _ in sides]),
                               head, chunk_size).split(sizes)
    sums, counts = [], []
    for (_, _, pair), logps in zip(sides, token_logps, strict=True):
        sums.append(logps.new_zeros(batch.num_pairs).index_add(0, pair, logps))
        counts.append(logps.new_zeros(batch.num_pairs).index_add(0, pair, torch.ones_like(logps)))
    chosen_logps, rejected_logps = sums[0] / counts[0], sums[1] / counts[1]
    if not nll_over_prompt:
        return chosen_logps, rejected_logps, -chosen_logps
    return chosen_logps, rejected_logps, -(sums[0] + sums[2]) / (counts[0] + counts[2])
