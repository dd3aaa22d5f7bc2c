"""Held-out evaluation: reward accuracy, log-odds ratio, reward margin and chosen NLL.

Pairs are batched (longest first, so padding stays small) and run without gradients; only
one batch's chunked log-probs exist at a time (no full-vocabulary logits, see ``step.py``).
Metrics are averaged over pairs, not batches, so the last short batch weighs what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .collate import TokenizedPair, collate_pairs
from .loss import log_odds
from .step import forward_logps


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    beta: float,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    chunk_size: int = 128,
    nll_over_prompt: bool = False,
    progress: bool = True,
    pad_to_multiple_of: int = 1,
) -> dict[str, float]:
    """Evaluate ``pairs``; returns plain floats (this is a log point, so syncing is fine).

    Keys: ``pairs``, ``reward_accuracy`` (share of pairs with log_odds_w > log_odds_l),
    ``log_odds_ratio``, ``reward_margin`` (beta * (logp_w - logp_l)), ``nll`` (chosen),
    ``or_loss`` and ``loss`` (nll + beta * or_loss), all means over pairs.
    """
    was_training = model.training
    model.eval()  # dropout off; model.py has disabled bitsandbytes' CPU repacking
    ordered = sorted(pairs, key=lambda p: -(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))))
    chosen_logps, rejected_logps, chosen_nll = [], [], []
    try:
        batches = range(0, len(ordered), batch_size)
        for start in tqdm(batches, desc="evaluating", disable=not progress or None, leave=False, unit="batch"):
            batch = collate_pairs(ordered[start : start + batch_size], pad_token_id, pad_to_multiple_of).to(device)
            chosen = forward_logps(model, batch.chosen, chunk_size, nll_over_prompt)
            rejected = forward_logps(model, batch.rejected, chunk_size, nll_over_prompt)
            chosen_logps.append(chosen.logps.float().cpu())
            rejected_logps.append(rejected.logps.float().cpu())
            chosen_nll.append(chosen.nll.float().cpu())
    finally:
        model.train(was_training)
    return summarise(torch.cat(chosen_logps), torch.cat(rejected_logps), torch.cat(chosen_nll), beta)


def summarise(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, beta: float
) -> dict[str, float]:
    """Per-pair log-probs ``(n,)`` -> evaluation metrics (see :func:`evaluate_pairs`)."""
    ratio = log_odds(chosen_logps.double()) - log_odds(rejected_logps.double())
    or_losses = -torch.nn.functional.logsigmoid(ratio)
    nll = chosen_nll.double().mean().item()
    return {
        "pairs": int(chosen_logps.numel()),
        "reward_accuracy": (ratio > 0).double().mean().item(),
        "log_odds_ratio": ratio.mean().item(),
        "reward_margin": (beta * (chosen_logps.double() - rejected_logps.double())).mean().item(),
        "nll": nll,
        "or_loss": or_losses.mean().item(),
        "loss": nll + beta * or_losses.mean().item(),
    }
