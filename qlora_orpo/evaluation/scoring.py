"""Held-out evaluation: reward accuracy with its interval, log-odds ratio, margin, log-probs, chosen NLL.

Pairs are batched (longest first, so padding stays small) and run without gradients; only
one batch's chunked log-probs exist at a time (no full-vocabulary logits, see ``step.py``).
:func:`score_pairs` keeps the per-pair log-probs (in the pairs' order); metrics are means
over pairs, not batches. Base and adapter are scored on the same pairs, so their difference
gets a paired bootstrap interval (:func:`compare_scores`, ``stats.py``): that interval, not
two separate ones, says whether a gain excludes zero.

The standalone ``qlora-orpo eval`` run (load, hold out, score base and adapter) is
``recipes/evaluate.py``; the run's own evaluations are ``run_evaluator.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.collate import SideBatch, TokenizedPair, collate_pairs
from ..data.packing import SharedBatch, pack_shared
from ..training.loss import log_odds
from ..training.step import SideForward
from .stats import paired_bootstrap, wilson_interval


@dataclass
class PairScores:
    """Per-pair log-probs of one model on a list of pairs, in the list's order; each ``(n,)`` float64."""

    chosen_logps: torch.Tensor  # mean log-prob of the chosen response tokens
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor  # over the response, or prompt + response (nll_over_prompt)

    def log_odds_ratios(self) -> torch.Tensor:
        return log_odds(self.chosen_logps) - log_odds(self.rejected_logps)

    def correct(self) -> torch.Tensor:
        """1.0 where the model prefers the chosen response (log-odds w > l), else 0.0."""
        return (self.log_odds_ratios() > 0).double()


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    chunk_size: int = 64,
    nll_over_prompt: bool = False,
    progress: bool = True,
    pad_to_multiple_of: int = 1,
    forward: Callable[[SideBatch | SharedBatch], tuple[torch.Tensor, ...]] | None = None,
    shared: bool = False,
    pack_tokens: int = 0,
) -> PairScores:
    """Forward every pair without gradients, longest first (little padding); scores come back in ``pairs`` order.

    ``forward``: a ``step.SideForward`` of ``model`` with the same settings to call instead
    (FSDP2 gathers the weights only in the hooks of the module it sharded, that one).
    ``shared``: each batch in the prompt-shared layout (``data/packing.py``, rows of up to
    ``pack_tokens``), one forward per batch instead of two: the same scores, the prompt run once.
    """
    forward = SideForward(model, chunk_size, nll_over_prompt) if forward is None else forward
    was_training = model.training
    model.eval()  # dropout off; models/loader.py has disabled bitsandbytes' CPU repacking
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids),
                                                                                      len(pairs[i].rejected_ids))))
    chosen_logps, rejected_logps, chosen_nll = [], [], []
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="evaluating", disable=not progress or None, leave=False, unit="batch"):
            batch_pairs = [pairs[i] for i in order[start : start + batch_size]]
            if shared:
                packed = pack_shared(batch_pairs, pad_token_id, pack_tokens, pad_to_multiple_of).to(device)
                chosen, rejected, chosen_side_nll = forward(packed)
            else:
                batch = collate_pairs(batch_pairs, pad_token_id, pad_to_multiple_of).to(device)
                chosen, chosen_side_nll = forward(batch.chosen)
                rejected, _ = forward(batch.rejected)
            chosen_logps.append(chosen.double().cpu())
            rejected_logps.append(rejected.double().cpu())
            chosen_nll.append(chosen_side_nll.double().cpu())
    finally:
        model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    empty = torch.empty(0, dtype=torch.float64)
    return PairScores(*((torch.cat(parts) if parts else empty)[inverse] for parts in
                        (chosen_logps, rejected_logps, chosen_nll)))


def evaluate_pairs(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    beta: float,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    chunk_size: int = 64,
    nll_over_prompt: bool = False,
    progress: bool = True,
    pad_to_multiple_of: int = 1,
) -> dict[str, float]:
    """Evaluate ``pairs``; returns plain floats (this is a log point, so syncing is fine). Keys: :func:`summarise`'s."""
    scores = score_pairs(model, pairs, pad_token_id, device, batch_size, chunk_size, nll_over_prompt, progress,
                         pad_to_multiple_of)
    return summarise_scores(scores, beta)


def summarise_scores(scores: PairScores, beta: float) -> dict[str, float]:
    return summarise(scores.chosen_logps, scores.rejected_logps, scores.chosen_nll, beta)


def summarise(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, beta: float
) -> dict[str, float]:
    """Per-pair log-probs ``(n,)`` -> evaluation metrics, means over pairs.

    Keys: ``pairs``; ``reward_accuracy`` (share of pairs with log_odds_w > log_odds_l) and its
    95% Wilson interval ``reward_accuracy_low``/``_high``; ``log_odds_ratio``; ``reward_margin``
    (beta * (logp_w - logp_l)); ``chosen_logp`` and ``rejected_logp`` (mean length-normalised
    log-probs: both falling together is collapse, not preference); ``nll`` (chosen);
    ``or_loss``; ``loss`` (nll + beta * or_loss).
    """
    chosen_logps, rejected_logps = chosen_logps.double(), rejected_logps.double()
    ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
    or_losses = -torch.nn.functional.logsigmoid(ratio)
    nll = chosen_nll.double().mean().item()
    correct = int((ratio > 0).sum().item())
    low, high = wilson_interval(correct, int(ratio.numel()))
    return {
        "pairs": int(chosen_logps.numel()),
        "reward_accuracy": (ratio > 0).double().mean().item(),
        "reward_accuracy_low": low,
        "reward_accuracy_high": high,
        "log_odds_ratio": ratio.mean().item(),
        "reward_margin": (beta * (chosen_logps - rejected_logps)).mean().item(),
        "chosen_logp": chosen_logps.mean().item(),
        "rejected_logp": rejected_logps.mean().item(),
        "nll": nll,
        "or_loss": or_losses.mean().item(),
        "loss": nll + beta * or_losses.mean().item(),
    }


# Per-pair quantities whose adapter-minus-base change gets a paired interval: (key, per-pair values).
PAIRED = (
    ("reward_accuracy", lambda s, beta: s.correct()),
    ("log_odds_ratio", lambda s, beta: s.log_odds_ratios()),
    ("reward_margin", lambda s, beta: beta * (s.chosen_logps - s.rejected_logps)),
    ("chosen_logp", lambda s, beta: s.chosen_logps),
    ("rejected_logp", lambda s, beta: s.rejected_logps),
    ("nll", lambda s, beta: s.chosen_nll),
)


def compare_scores(base: PairScores, adapter: PairScores, beta: float, confidence: float = 0.95) -> dict[str, Any]:
    """Adapter minus base on the same pairs: each change with a paired bootstrap interval.

    ``{key: {"change", "low", "high"}}`` for the keys of :data:`PAIRED`, plus ``gained`` and
    ``lost``: pairs the adapter gets right that the base got wrong, and the reverse.
    """
    if base.chosen_logps.shape != adapter.chosen_logps.shape:
        raise ValueError("base and adapter must be scored on the same pairs")
    out: dict[str, Any] = {}
    for key, values in PAIRED:
        change, low, high = paired_bootstrap(values(adapter, beta) - values(base, beta), confidence)
        out[key] = {"change": change, "low": low, "high": high}
    before, after = base.correct().bool(), adapter.correct().bool()
    out["gained"] = int((after & ~before).sum())
    out["lost"] = int((before & ~after).sum())
    return out


# ---------------------------------------------------------------------------------------------
# Base and adapter, side by side (scripts/evaluate.py)
# ---------------------------------------------------------------------------------------------

# The config fields that decide what is evaluated and how; the rest of a run's config is ignored.
EVAL_FIELDS = (
    "model", "data", "data_split", "prompt_field", "chosen_field", "rejected_field", "strict",
    "eval_fraction", "test_fraction", "eval_data", "eval_max_pairs", "max_length", "max_prompt_length", "beta",
    "nll_over_prompt",
    "quant", "compute_dtype", "device", "logits_chunk_size", "eval_batch_size", "pad_to_multiple_of",
    "health_prompts", "health_max_new_tokens", "chat_template", "system_prompt",
)


def evaluate_base_and_adapter(
    model: nn.Module, pairs: Sequence[TokenizedPair], beta: float, pad_token_id: int, **settings: Any
) -> dict[str, Any]:
    """``{"base", "adapter", "change"}``: :func:`summarise` of each on the same pairs, and :func:`compare_scores`.

    ``settings`` are :func:`score_pairs`' keyword arguments (device, batch size, ...). For a
    peft model the base is the same model inside ``disable_adapter()``, so it is loaded once;
    for a plain model ``"adapter"`` and ``"change"`` are None.
    """
    if not hasattr(model, "disable_adapter"):
        scores = score_pairs(model, pairs, pad_token_id, **settings)
        return {"base": summarise_scores(scores, beta), "adapter": None, "change": None}
    with model.disable_adapter():
        base = score_pairs(model, pairs, pad_token_id, **settings)
    adapter = score_pairs(model, pairs, pad_token_id, **settings)
    return {"base": summarise_scores(base, beta), "adapter": summarise_scores(adapter, beta),
            "change": compare_scores(base, adapter, beta)}
