"""Generation health: do greedy replies still end their turn, and do they repeat themselves?

Preference metrics can improve while generation degenerates: too strong a contrast pushes
down the rejected tokens' logits until the model loops or never ends its turn (ORPO paper,
section 7.1). These figures catch that, on a fixed set of held-out prompts, greedy:

* ``ended_rate``: share of replies that emitted a stop token (the chat template's end-of-turn
  or EOS, :func:`templating.stop_token_ids`) within ``max_new_tokens``;
* ``seq_rep_4``: per reply, ``1 - distinct 4-grams / 4-grams`` (Welleck et al. 2019), averaged
  over replies: 0 for no repeated 4-gram, near 1 for a loop;
* ``distinct_2``: distinct 2-grams / 2-grams across all replies pooled (Li et al. 2016): low
  when every reply says the same thing;
* ``median_length_ratio`` (:func:`compare_health`): median over prompts of the reply length
  over the base's reply length to the same prompt.

Token lists exclude the stop token itself. The metric functions are pure functions of
token-id lists; :func:`generate_greedy` is the only part that touches a model.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..data.preferences import Message, PreferencePair

# The health gate's defaults (issue 11's targets): the end-of-turn rate may fall at most 5
# points below the base's, seq-rep-4 may rise at most 0.05 above it.
MAX_ENDED_DROP = 0.05
MAX_REP_RISE = 0.05


# ---------------------------------------------------------------------------------------------
# Pure metrics on token-id lists
# ---------------------------------------------------------------------------------------------


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def seq_rep_n(ids: Sequence[int], n: int = 4) -> float:
    """``1 - |distinct n-grams| / |n-grams|`` of one reply; 0.0 for a reply shorter than ``n``."""
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(replies: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams, pooled across ``replies``; 0.0 when there are none."""
    grams = [g for ids in replies for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ended_rate(ended: Sequence[bool]) -> float:
    """Share of replies that ended with a stop token; NaN for no replies."""
    return sum(bool(e) for e in ended) / len(ended) if ended else float("nan")


def median_length_ratio(lengths: Sequence[int], base_lengths: Sequence[int]) -> float:
    """Median over prompts of ``length / base_length`` (a base length of 0 counts as 1)."""
    if len(lengths) != len(base_lengths):
        raise ValueError(f"{len(lengths)} replies against {len(base_lengths)} base replies")
    if not lengths:
        return float("nan")
    return statistics.median(a / max(b, 1) for a, b in zip(lengths, base_lengths, strict=True))


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One greedy reply: its tokens (stop token excluded), whether it ended, and its text."""

    ids: list[int]
    ended: bool
    text: str


@dataclass
class HealthResult:
    """Summary figures (:func:`summarise_replies`) and the replies they came from, prompt by prompt."""

    metrics: dict[str, float]
    prompts: list[str]  # the last user message of each prompt, for the report
    replies: list[Reply] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "prompts": self.prompts, "replies": [asdict(r) for r in self.replies]}


def split_reply(generated: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Generated ids -> (the reply before the first stop token, whether there was one).

    Batched generation pads rows that finished early; those pads come after the stop token,
    so cutting there drops them too.
    """
    stops = set(stop_ids)
    for i, token in enumerate(generated):
        if token in stops:
            return list(generated[:i]), True
    return list(generated), False


def summarise_replies(replies: Sequence[Reply]) -> dict[str, float]:
    lengths = [len(r.ids) for r in replies]
    return {
        "prompts": len(replies),
        "ended_rate": ended_rate([r.ended for r in replies]),
        "seq_rep_4": statistics.fmean(seq_rep_n(r.ids, 4) for r in replies) if replies else float("nan"),
        "distinct_2": distinct_n([r.ids for r in replies], 2),
        "mean_length": statistics.fmean(lengths) if lengths else float("nan"),
        "median_length": float(statistics.median(lengths)) if lengths else float("nan"),
    }


def compare_health(base: dict[str, float], adapter: dict[str, float], base_replies: Sequence[Reply],
                   adapter_replies: Sequence[Reply]) -> dict[str, float]:
    """Adapter minus base for each figure, plus the median length ratio to the base."""
    change = {k: adapter[k] - base[k] for k in ("ended_rate", "seq_rep_4", "distinct_2", "mean_length")}
    change["median_length_ratio"] = median_length_ratio(
        [len(r.ids) for r in adapter_replies], [len(r.ids) for r in base_replies]
    )
    return change


def health_gate(
    base: dict[str, float], candidate: dict[str, float],
    max_ended_drop: float = MAX_ENDED_DROP, max_rep_rise: float = MAX_REP_RISE,
) -> tuple[bool, str]:
    """``(passes, why)``: the candidate ends its turn about as often as the base and repeats little more."""
    problems = []
    if candidate["ended_rate"] < base["ended_rate"] - max_ended_drop - 1e-12:
        problems.append(f"end-of-turn rate {candidate['ended_rate']:.2f} < base {base['ended_rate']:.2f} - {max_ended_drop}")
    if candidate["seq_rep_4"] > base["seq_rep_4"] + max_rep_rise + 1e-12:
        problems.append(f"seq-rep-4 {candidate['seq_rep_4']:.3f} > base {base['seq_rep_4']:.3f} + {max_rep_rise}")
    return (not problems), "; ".join(problems) or "healthy"


# ---------------------------------------------------------------------------------------------
# Prompts and generation
# ---------------------------------------------------------------------------------------------


def select_prompts(
    pairs: Sequence[PreferencePair], tokenizer, count: int, max_prompt_length: int
) -> list[tuple[Message, ...]]:
    """The first ``count`` distinct prompts of ``pairs`` (held-out, in data order) that fit ``max_prompt_length``.

    A fixed choice, so base, adapter and every checkpoint answer the same prompts; prompts
    longer than training allowed are skipped rather than cut (a cut conversation is another prompt).
    """
    from ..data.templating import ChatFormat, render_prompt

    fmt = ChatFormat.of(tokenizer)
    chosen: list[tuple[Message, ...]] = []
    seen: set[str] = set()
    for pair in pairs:
        if len(chosen) >= count:
            break
        text = render_prompt(tokenizer, pair.prompt, fmt)
        if text in seen:
            continue
        if len(tokenizer(text, add_special_tokens=not fmt.templated)["input_ids"]) <= max_prompt_length:
            seen.add(text)
            chosen.append(tuple(pair.prompt))
    return chosen


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    synced: bool = False,
) -> list[Reply]:
    """Greedy replies to ``prompts`` (chat template, generation prompt), in order.

    Batched with left padding (prompts sorted by length so a batch pads little); generation
    stops at the template's end-of-turn tokens or EOS. The model is put in eval mode and
    restored afterwards; the KV cache is asked for explicitly (training may have turned it off).
    ``synced``: every rank of a sharded (FSDP2) model calls this; each forward is a collective,
    so a rank whose replies all ended keeps stepping until every rank's have (transformers'
    ``synced_gpus``) rather than leaving the others waiting.
    """
    from ..data.templating import ChatFormat, encode_prompt, generation_config

    fmt = ChatFormat.of(tokenizer)
    config = generation_config(tokenizer, max_new_tokens, fmt)
    pad, stops = config.pad_token_id, config.eos_token_id
    encoded = [encode_prompt(tokenizer, p, fmt) for p in prompts]
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    replies: dict[int, Reply] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # (batch, width): pads on the left, so every prompt ends where generation starts.
            input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + list(encoded[i]) for i in rows])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows])
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config,
                synced_gpus=True if synced else None,  # None: transformers decides, as before
            )
            for row, generated in zip(rows, output[:, width:].tolist(), strict=True):
                ids, ended = split_reply(generated, stops)
                replies[row] = Reply(ids, ended, tokenizer.decode(ids, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return [replies[i] for i in range(len(encoded))]


def generation_health(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    synced: bool = False,
) -> HealthResult:
    """Greedy replies to ``prompts`` and their health figures (see the module docstring)."""
    replies = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, synced)
    shown = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in prompts]
    return HealthResult(summarise_replies(replies), shown, replies)


def side_by_side(base: HealthResult, adapter: HealthResult, max_new_tokens: int) -> dict[str, Any]:
    """``{"base", "adapter", "change", "gate", "max_new_tokens"}``: the two results, compared and gated."""
    passes, why = health_gate(base.metrics, adapter.metrics)
    return {
        "base": base.to_dict(),
        "adapter": adapter.to_dict(),
        "change": compare_health(base.metrics, adapter.metrics, base.replies, adapter.replies),
        "gate": {"passes": passes, "why": why},
        "max_new_tokens": max_new_tokens,
    }


def health_side_by_side(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    base: HealthResult | None = None,
) -> dict[str, Any]:
    """:func:`side_by_side` for a peft ``model``, whose base is the same model with the adapter switched off.

    ``base`` reuses a result computed earlier (the base does not change during training).
    """
    if base is None:
        with model.disable_adapter():
            base = generation_health(model, tokenizer, prompts, max_new_tokens, batch_size)
    adapter = generation_health(model, tokenizer, prompts, max_new_tokens, batch_size)
    return side_by_side(base, adapter, max_new_tokens)
