"""Held-out evaluation: reward accuracy, log-odds ratio, reward margin and chosen NLL.

Pairs are batched (longest first, so padding stays small) and run without gradients; only
one batch's chunked log-probs exist at a time (no full-vocabulary logits, see ``step.py``).
Metrics are averaged over pairs, not batches, so the last short batch weighs what it holds.

``scripts/evaluate.py`` (:func:`main`) runs the same evaluation outside training: the base
loaded as training loads it (4-bit NF4 unless ``--quant none``), the held-out split that
training held out (``data.split_holdout`` with the same ``eval_fraction``, the same
tokenisation and the same first ``eval_max_pairs``), and, with ``--adapter``, the base alone
and base + adapter side by side. The base is loaded once: its numbers come from the same
model with the adapter switched off (``PeftModel.disable_adapter()``). Settings default to
the adapter's own training config (recorded in its card), so evaluating a run's adapter
reproduces that run's ``before`` and ``after`` records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .collate import TokenizedPair, collate_pairs
from .config import OrpoConfig
from .errors import UserError
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
    chunk_size: int = 64,
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


# ---------------------------------------------------------------------------------------------
# Base and adapter, side by side (scripts/evaluate.py)
# ---------------------------------------------------------------------------------------------

# What the markdown table shows, in order: (key, label, format).
TABLE_ROWS = (
    ("reward_accuracy", "reward accuracy (log-odds w > l)", "{:.3f}"),
    ("log_odds_ratio", "mean log-odds ratio", "{:+.4f}"),
    ("reward_margin", "mean reward margin beta * (logp_w - logp_l)", "{:+.5f}"),
    ("nll", "chosen NLL", "{:.4f}"),
    ("or_loss", "odds-ratio loss L_OR", "{:.4f}"),
    ("loss", "ORPO loss", "{:.4f}"),
)
# The config fields that decide what is evaluated and how; the rest of a run's config is ignored.
EVAL_FIELDS = (
    "model", "data", "data_split", "prompt_field", "chosen_field", "rejected_field", "strict",
    "eval_fraction", "eval_max_pairs", "max_length", "max_prompt_length", "beta", "nll_over_prompt",
    "quant", "compute_dtype", "device", "logits_chunk_size", "eval_batch_size", "pad_to_multiple_of",
)


def evaluate_base_and_adapter(
    model: nn.Module, pairs: Sequence[TokenizedPair], beta: float, pad_token_id: int, **settings: Any
) -> dict[str, dict[str, float] | None]:
    """``{"base": metrics, "adapter": metrics}`` of :func:`evaluate_pairs` on the same pairs.

    ``settings`` are :func:`evaluate_pairs`' keyword arguments (device, batch size, ...). For a
    peft model the base is the same model inside ``disable_adapter()``, so it is loaded once;
    for a plain model ``"adapter"`` is None.
    """
    if not hasattr(model, "disable_adapter"):
        return {"base": evaluate_pairs(model, pairs, beta, pad_token_id, **settings), "adapter": None}
    with model.disable_adapter():
        base = evaluate_pairs(model, pairs, beta, pad_token_id, **settings)
    return {"base": base, "adapter": evaluate_pairs(model, pairs, beta, pad_token_id, **settings)}


def load_base_for_evaluation(cfg: OrpoConfig):
    """``(model, tokenizer, device)``: the base as ``model.load_model_for_training`` loads it, for inference.

    The same loader (``model.load_base``: quantisation, compute dtype, the bitsandbytes CPU
    work-around) as training, so on the CPU the numbers equal those of the training run's
    own evaluations; no LoRA, no gradient checkpointing.
    """
    from .model import load_base, load_tokenizer, resolve_compute_dtype, resolve_model_path, select_device

    path = resolve_model_path(cfg.model)
    device = select_device(cfg.device)
    tokenizer = load_tokenizer(path)
    # Unquantised tensors in float32 on every device: the adapter's fingerprint check hashes
    # the embedding bytes of the float32 checkpoint (a 16-bit copy has other bytes).
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    model = load_base(path, cfg.quant, device, compute_dtype, dtype=torch.float32, name=cfg.model)
    return model, tokenizer, device


def attach_adapter(model: nn.Module, tokenizer, adapter_dir: str | Path, force: bool = False) -> nn.Module:
    """``model`` wrapped with the adapter, after ``adapters.load_adapter``'s base fingerprint check."""
    from .adapters import load_adapter

    return load_adapter(model, tokenizer, adapter_dir, force=force)


def heldout_pairs(cfg: OrpoConfig, tokenizer) -> tuple[list[TokenizedPair], dict[str, Any]]:
    """The pairs ``train.run`` evaluates on, tokenised; plus a description of where they came from."""
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
    }


def run_evaluation(
    cfg: OrpoConfig, adapter: str | Path | None = None, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Load once, evaluate the base and (with ``adapter``) base + adapter on the held-out pairs.

    Returns ``{"settings", "pairs", "base", "adapter"}``; ``adapter`` is None without one.
    """
    model, tokenizer, device = load_base_for_evaluation(cfg)
    if adapter is not None:
        model = attach_adapter(model, tokenizer, adapter, force=force)
        model.eval()
    pairs, where = heldout_pairs(cfg, tokenizer)
    results = evaluate_base_and_adapter(
        model, pairs, cfg.beta, tokenizer.pad_token_id, device=device, batch_size=cfg.eval_batch_size,
        chunk_size=cfg.logits_chunk_size, nll_over_prompt=cfg.nll_over_prompt, progress=progress,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    settings = {name: getattr(cfg, name) for name in EVAL_FIELDS if hasattr(cfg, name)}
    settings["adapter"] = str(adapter) if adapter is not None else None
    settings["device"] = str(device)
    return {"settings": settings, "pairs": where, **results}


def markdown_report(result: dict[str, Any]) -> str:
    """The result of :func:`run_evaluation` as a short heading line and a markdown table."""
    settings, pairs = result["settings"], result["pairs"]
    base, adapter = result["base"], result.get("adapter")
    lines = [
        f"Held-out evaluation: {pairs['evaluated']} pairs (of {pairs['held_out']} held out at eval_fraction "
        f"{settings['eval_fraction']} from {pairs['data']}), max_length {settings['max_length']}, "
        f"beta {settings['beta']}, NLL over {'prompt + response' if settings['nll_over_prompt'] else 'response'}, "
        f"{'unquantised' if settings['quant'] == 'none' else settings['quant']} base.",
        "",
    ]
    if adapter is None:
        lines += ["| metric | base |", "|---|---:|"]
        lines += [f"| {label} | {fmt.format(base[key])} |" for key, label, fmt in TABLE_ROWS]
    else:
        lines += ["| metric | base | base + adapter | change |", "|---|---:|---:|---:|"]
        for key, label, fmt in TABLE_ROWS:
            signed = fmt if "+" in fmt else fmt.replace("{:", "{:+", 1)  # the metric's format, with a sign
            change = signed.format(adapter[key] - base[key])
            lines.append(f"| {label} | {fmt.format(base[key])} | {fmt.format(adapter[key])} | {change} |")
    return "\n".join(lines)


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
    # The device is this machine's business, not the training machine's.
    return {k: v for k, v in values.items() if k in EVAL_FIELDS and k != "device"}
