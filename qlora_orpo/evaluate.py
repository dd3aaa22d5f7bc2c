"""Held-out evaluation: reward accuracy with its interval, log-odds ratio, margin, log-probs, chosen NLL.

Pairs are batched (longest first, so padding stays small) and run without gradients; only
one batch's chunked log-probs exist at a time (no full-vocabulary logits, see ``step.py``).
:func:`score_pairs` keeps the per-pair log-probs (in the pairs' order); metrics are means
over pairs, not batches. Base and adapter are scored on the same pairs, so their difference
gets a paired bootstrap interval (:func:`compare_scores`, ``stats.py``): that interval, not
two separate ones, says whether a gain excludes zero.

``scripts/evaluate.py`` (:func:`main`) runs the same evaluation outside training: the base
loaded as training loads it (4-bit NF4 unless ``--quant none``), the held-out split that
training held out (``data.split_holdout`` with the same ``eval_fraction`` and tokenisation),
every held-out pair unless ``--max-pairs``, and, with ``--adapter``, the base alone and
base + adapter side by side, plus generation health on held-out prompts (``health.py``).
The base is loaded once: its numbers come from the same model with the adapter switched off
(``PeftModel.disable_adapter()``). Settings default to the adapter's own training config
(recorded in its card), so evaluating a run's adapter reproduces that run's ``before`` and
``after`` records. The markdown report is ``report.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .collate import SideBatch, TokenizedPair, collate_pairs
from .config import OrpoConfig
from .errors import UserError
from .loss import log_odds
from .report import markdown_report  # noqa: F401  (re-exported: evaluate.markdown_report)
from .stats import paired_bootstrap, wilson_interval
from .step import forward_logps


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
    forward: Callable[[SideBatch], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PairScores:
    """Forward every pair without gradients, longest first (little padding); scores come back in ``pairs`` order.

    ``forward``: a ``step.SideForward`` of ``model`` with the same settings to call instead
    (FSDP2 gathers the weights only in the hooks of the module it sharded, that one).
    """

    def plain(side: SideBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = forward_logps(model, side, chunk_size, nll_over_prompt)
        return out.logps, out.nll

    forward = plain if forward is None else forward
    was_training = model.training
    model.eval()  # dropout off; model.py has disabled bitsandbytes' CPU repacking
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids),
                                                                                      len(pairs[i].rejected_ids))))
    chosen_logps, rejected_logps, chosen_nll = [], [], []
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="evaluating", disable=not progress or None, leave=False, unit="batch"):
            batch_pairs = [pairs[i] for i in order[start : start + batch_size]]
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
    "eval_fraction", "eval_max_pairs", "max_length", "max_prompt_length", "beta", "nll_over_prompt",
    "quant", "compute_dtype", "device", "logits_chunk_size", "eval_batch_size", "pad_to_multiple_of",
    "health_prompts", "health_max_new_tokens",
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


def load_base_for_evaluation(cfg: OrpoConfig):
    """``(model, tokenizer, device)``: the base as ``model.load_model_for_training`` loads it, for inference.

    The same loader (``model.load_base``: quantisation, compute dtype, the bitsandbytes CPU
    work-around) as training, so the numbers equal those of the training run's own
    evaluations; no LoRA, no gradient checkpointing.
    """
    from .model import load_base, load_tokenizer, resolve_compute_dtype, resolve_model_path, select_device

    path = resolve_model_path(cfg.model)
    device = select_device(cfg.device)
    tokenizer = load_tokenizer(path)
    model = load_base(path, cfg.quant, device, resolve_compute_dtype(cfg.compute_dtype, device), name=cfg.model)
    return model, tokenizer, device


def attach_adapter(model: nn.Module, tokenizer, adapter_dir: str | Path, force: bool = False) -> nn.Module:
    """``model`` wrapped with the adapter, after ``adapters.load_adapter``'s base fingerprint check."""
    from .adapters import load_adapter

    return load_adapter(model, tokenizer, adapter_dir, force=force)


def heldout_pairs(cfg: OrpoConfig, tokenizer) -> tuple[list[TokenizedPair], dict[str, Any], list[Any]]:
    """The pairs ``train.run`` evaluates on, tokenised; a description of where they came from; the untokenised held-out pairs."""
    from .data import load_from_config, split_holdout
    from .templating import tokenize_pairs

    if cfg.eval_fraction <= 0:
        raise UserError("eval_fraction: 0 holds nothing out, so there is nothing to evaluate")
    data = load_from_config(cfg)
    _, held = split_holdout(data.pairs, cfg.eval_fraction)
    tokenized, stats = tokenize_pairs(held, tokenizer, cfg.max_length, cfg.max_prompt_length, progress=False)
    if cfg.eval_max_pairs:
        tokenized = tokenized[: cfg.eval_max_pairs]
    if not tokenized:
        raise UserError(f"{data.source}: no held-out pair survived tokenisation (eval_fraction {cfg.eval_fraction})")
    return tokenized, {
        "data": data.source, "held_out": len(held), "evaluated": len(tokenized),
        "dropped": len(stats.dropped_rows), "truncated": stats.truncated,
    }, held


def run_evaluation(
    cfg: OrpoConfig, adapter: str | Path | None = None, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Load once, evaluate the base and (with ``adapter``) base + adapter on every held-out pair.

    Returns ``{"settings", "pairs", "base", "adapter", "change", "health"}``; ``adapter`` and
    ``change`` are None without an adapter, ``health`` (``health.health_side_by_side``, or the
    base's alone) is None when ``cfg.health_prompts`` is 0.
    """
    from .health import generation_health, health_side_by_side, select_prompts

    model, tokenizer, device = load_base_for_evaluation(cfg)
    if adapter is not None:
        model = attach_adapter(model, tokenizer, adapter, force=force)
        model.eval()
    pairs, where, held = heldout_pairs(cfg, tokenizer)
    results = evaluate_base_and_adapter(
        model, pairs, cfg.beta, tokenizer.pad_token_id, device=device, batch_size=cfg.eval_batch_size,
        chunk_size=cfg.logits_chunk_size, nll_over_prompt=cfg.nll_over_prompt, progress=progress,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    health = None
    if cfg.health_prompts:
        prompts = select_prompts(held, tokenizer, cfg.health_prompts, cfg.max_prompt_length)
        if adapter is not None:
            health = health_side_by_side(model, tokenizer, prompts, cfg.health_max_new_tokens, cfg.eval_batch_size)
        else:
            base = generation_health(model, tokenizer, prompts, cfg.health_max_new_tokens, cfg.eval_batch_size)
            health = {"base": base.to_dict(), "adapter": None, "max_new_tokens": cfg.health_max_new_tokens}
    settings = {name: getattr(cfg, name) for name in EVAL_FIELDS if hasattr(cfg, name)}
    settings["adapter"] = str(adapter) if adapter is not None else None
    settings["device"] = str(device)
    return {"settings": settings, "pairs": where, **results, "health": health}


def resolve_eval_config(
    adapter: str | Path | None, config_file: str | Path | None, overrides: dict[str, Any]
) -> OrpoConfig:
    """Defaults < the adapter's training config (its card) < ``config_file`` < ``overrides`` (flags)."""
    values: dict[str, Any] = {}
    if adapter is not None:
        values.update(_adapter_training_config(Path(adapter)))
    if config_file is not None:
        values.update(OrpoConfig.read_file(config_file))
    values.update(overrides)
    known = {f.name for f in fields(OrpoConfig)}
    return OrpoConfig.from_dict({k: v for k, v in values.items() if k in known}, source="evaluation settings")


def _adapter_training_config(adapter: Path) -> dict[str, Any]:
    """The evaluation-relevant part of the config an adapter was trained with, if recorded.

    From the card's ``qlora_orpo.training``; for an adapter without a card, from the
    ``config.yaml`` of the run directory around it (``runs/<name>/adapter``).
    """
    values: dict[str, Any] = {}
    card = adapter / "README.md"
    if card.is_file():
        from .adapters import AdapterError, parse_card

        try:
            training = parse_card(card.read_text(encoding="utf-8"), card)["qlora_orpo"].get("training") or {}
        except (AdapterError, OSError, UnicodeDecodeError):
            training = {}
        values = dict(training) if isinstance(training, dict) else {}
    elif (adapter.parent / "config.yaml").is_file():
        values = OrpoConfig.read_file(adapter.parent / "config.yaml")
    # The device is this machine's business, not the training machine's; and every held-out
    # pair is evaluated unless --max-pairs says otherwise (older runs capped theirs at 64).
    return {k: v for k, v in values.items() if k in EVAL_FIELDS and k not in ("device", "eval_max_pairs")}

