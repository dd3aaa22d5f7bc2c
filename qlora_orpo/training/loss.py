"""The ORPO loss as pure functions of tensors (no model, no config).

ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model"), for one pair with prompt x, preferred response y_w and dispreferred response y_l:

    logp(y|x)   = mean over response tokens of log P(token | prefix)      (length-normalised)
    log_odds(y) = logp - log(1 - exp(logp))
    L_OR        = -logsigmoid(log_odds(y_w) - log_odds(y_l))
    L           = NLL(y_w) + beta * L_OR

NLL covers the response tokens only by default (the paper's L_SFT); the official code and
TRL also average over the prompt tokens, which the caller can ask for by passing a
``chosen_nll`` computed over prompt + response (see ``step.py``).

A worked example, used by the tests: logp_w = -0.5, logp_l = -1.5, nll = 0.5, beta = 0.1:

    log_odds_w = -0.5 - log(1 - e^-0.5) = -0.5 + 0.9327521 =  0.4327521
    log_odds_l = -1.5 - log(1 - e^-1.5) = -1.5 + 0.2524825 = -1.2475175
    ratio      = 1.6802697;  L_OR = -logsigmoid(1.6802697) = 0.1708592
    L          = 0.5 + 0.1 * 0.1708592 = 0.5170859
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX

_LN2 = math.log(2.0)
_LOGP_CEILING = 1e-12  # log1mexp's input is clamped to at most -this (see there)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range.

    Written as is, ``log(1 - exp(x))`` returns -inf near 0 (``1 - exp(-1e-12)`` rounds to 0
    in float32) and loses relative precision for very negative x. The standard remedy
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))") switches at -ln 2:
    ``log(-expm1(x))`` above, ``log1p(-exp(x))`` below. Finite for x in [-1e4, -1e-12] in
    float32 and float64.

    x is clamped to at most -1e-12 (or the dtype's smallest normal number, if larger): a
    mean log-prob of exactly 0.0 (a short memorised reply in float32) would otherwise give
    -inf here, an infinite odds ratio and a NaN gradient that aborts the run. The clamp
    changes nothing a float32 model can resolve (a probability within 1e-12 of 1 is 1 to
    float32, whose eps is 1.2e-7), keeps ``1 / (1 - p)`` at most 1e12 (its square, in a
    gradient norm, stays finite in float32), and its gradient is 0 at the clamp.
    """
    x = torch.clamp(x, max=-max(_LOGP_CEILING, torch.finfo(x.dtype).tiny))
    # torch.where evaluates both branches; clamp the unused one so it cannot produce NaN
    # (whose gradient would poison the used branch through autograd).
    near_zero = x > -_LN2
    x_near = torch.where(near_zero, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near_zero, torch.full_like(x, -_LN2), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def sequence_logps(logits_or_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the labelled tokens of each sequence.

    Args:
        logits_or_logps: either logits ``(batch, seq, vocab)`` aligned with the *inputs*
            (position t predicts token t+1; this function shifts), or per-token log-probs
            ``(batch, seq)`` already aligned with ``labels`` (no shift; entries where
            ``labels == IGNORE_INDEX`` are ignored whatever they hold).
        labels: ``(batch, seq)`` token ids, ``IGNORE_INDEX`` (-100) where not scored.

    Returns:
        ``(batch,)``: sum of log P(label) over scored tokens / number of scored tokens.
        A sequence with no scored token gives NaN (0/0): the data pipeline never produces one.
    """
    if logits_or_logps.dim() == 3:
        logits = logits_or_logps[:, :-1, :]
        labels = labels[:, 1:]
        mask = labels != IGNORE_INDEX
        safe = labels.masked_fill(~mask, 0)
        # log_softmax in at least float32: bf16 logits would round the normaliser.
        logits = logits if logits.dtype == torch.float64 else logits.float()
        token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    elif logits_or_logps.dim() == 2:
        if logits_or_logps.shape != labels.shape:
            raise ValueError(f"per-token log-probs {tuple(logits_or_logps.shape)} must match labels {tuple(labels.shape)}")
        mask = labels != IGNORE_INDEX
        token_logps = logits_or_logps
    else:
        raise ValueError(f"expected logits (batch, seq, vocab) or log-probs (batch, seq), got {tuple(logits_or_logps.shape)}")
    mask_f = mask.to(token_logps.dtype)
    return (token_logps.masked_fill(~mask, 0.0) * mask_f).sum(-1) / mask_f.sum(-1)


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p, stably: ``logp - log1mexp(logp)``."""
    return logps - log1mexp(logps)


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of a batch of pairs, averaged over the batch.

    Args:
        chosen_logps: ``(batch,)`` mean log-prob of each chosen response (``sequence_logps``).
        rejected_logps: ``(batch,)`` the same for the rejected responses.
        chosen_nll: ``(batch,)`` NLL per chosen sequence (mean over the tokens it covers).
        beta: weight of the odds-ratio term.

    Returns:
        ``(loss, metrics)``: loss is a scalar ``mean(chosen_nll) + beta * mean(L_OR)``; metrics
        are detached 0-d tensors (no ``.item()`` here, so no device sync): ``nll``, ``or_loss``,
        ``log_odds_ratio``, ``log_odds_chosen``, ``rewards_chosen`` (beta * logp_w),
        ``rewards_rejected``, ``reward_margin``, ``reward_accuracy`` (share with logp_w > logp_l).
    """
    log_odds_chosen = log_odds(chosen_logps)
    log_odds_rejected = log_odds(rejected_logps)
    ratio = log_odds_chosen - log_odds_rejected
    or_losses = -F.logsigmoid(ratio)
    nll = chosen_nll.mean()
    or_loss = or_losses.mean()
    loss = nll + beta * or_loss
    rewards_chosen = beta * chosen_logps.detach()
    rewards_rejected = beta * rejected_logps.detach()
    metrics = {
        "nll": nll.detach(),
        "or_loss": or_loss.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds_chosen.detach().mean(),
        "rewards_chosen": rewards_chosen.mean(),
        "rewards_rejected": rewards_rejected.mean(),
        "reward_margin": (rewards_chosen - rewards_rejected).mean(),
        "reward_accuracy": (rewards_chosen > rewards_rejected).float().mean(),
    }
    return loss, metrics


def inverse_one_minus_p(logps: torch.Tensor) -> torch.Tensor:
    """d log_odds / d logp = 1 / (1 - p), computed as exp(-log1mexp(logp)) so it never divides by a rounded 0
    (at most 1e12: ``log1mexp`` clamps logp = 0)."""
    return torch.exp(-log1mexp(logps))


def orpo_logp_grads(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of the batch-mean odds-ratio part of ``orpo_loss``.

    With Δ = log_odds_w - log_odds_l and batch size B:

        dL/dlogp_w = -(beta / B) * σ(-Δ) / (1 - p_w)          (plus the NLL's own gradient)
        dL/dlogp_l = +(beta / B) * σ(-Δ) / (1 - p_l)

    because dL_OR/dΔ = -σ(-Δ) and d log_odds/d logp = 1 / (1 - p). The training step uses
    ``dL/dlogp_l`` to back-propagate the rejected pass on its own (see ``step.py``).

    Returns:
        ``(d_chosen, d_rejected)``, each ``(batch,)``, detached.
    """
    chosen_logps = chosen_logps.detach()
    rejected_logps = rejected_logps.detach()
    ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
    scale = beta / chosen_logps.numel() * torch.sigmoid(-ratio)
    return -scale * inverse_one_minus_p(chosen_logps), scale * inverse_one_minus_p(rejected_logps)
