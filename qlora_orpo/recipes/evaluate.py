"""The standalone evaluation (``qlora-orpo eval``, ``scripts/evaluate.py``): load, hold out, score.

``scripts/evaluate.py`` (:func:`main`) runs the same evaluation outside training: the base
loaded as training loads it (4-bit NF4 unless ``--quant none``), the held-out split that
training held out (``data.split_holdout`` with the same ``eval_fraction`` and tokenisation),
every held-out pair unless ``--max-pairs``, and, with ``--adapter``, the base alone and
base + adapter side by side, plus generation health on held-out prompts (``evaluation/health.py``).
The base is loaded once: its numbers come from the same model with the adapter switched off
(``PeftModel.disable_adapter()``). Settings default to the adapter's own training config
(recorded in its card), so evaluating a run's adapter reproduces that run's ``before`` and
``after`` records. The markdown report is ``evaluation/report.py``'s.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from ..config import OrpoConfig, row_tokens
from ..core.errors import UserError
from ..data.collate import TokenizedPair
from ..evaluation.scoring import EVAL_FIELDS, evaluate_base_and_adapter


def load_base_for_evaluation(cfg: OrpoConfig, tokenizer_dir: str | Path | None = None):
    """``(model, tokenizer, device)``: the base as ``model.load_model_for_training`` loads it, for inference.

    The same loader (``model.load_base``: quantisation, compute dtype, the bitsandbytes CPU
    work-around) as training, so the numbers equal those of the training run's own
    evaluations; no LoRA, no gradient checkpointing. ``tokenizer_dir``: where to read the tokenizer
    instead (an adapter's, saved with its chat template), else the base's with ``cfg.chat_template``.
    """
    from ..models.loader import (
        load_base,
        load_tokenizer,
        resolve_compute_dtype,
        resolve_model_path,
        select_device,
    )

    path = resolve_model_path(cfg.model)
    device = select_device(cfg.device)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else load_tokenizer(path, cfg.chat_template)
    model = load_base(path, cfg.quant, device, resolve_compute_dtype(cfg.compute_dtype, device), name=cfg.model)
    return model, tokenizer, device


def attach_adapter(model: nn.Module, tokenizer, adapter_dir: str | Path, force: bool = False) -> nn.Module:
    """``model`` wrapped with the adapter, after ``adapters.load_adapter``'s base fingerprint check."""
    from ..export.adapters import load_adapter

    return load_adapter(model, tokenizer, adapter_dir, force=force)


def heldout_pairs(
    cfg: OrpoConfig, tokenizer, test: bool = False
) -> tuple[list[TokenizedPair], dict[str, Any], list[Any]]:
    """The pairs ``train.run`` evaluates on (the ``eval_data`` file's, else the hash share of ``data``), tokenised;
    a description of where they came from; the untokenised held-out pairs. With ``test``, the
    run's test split instead (the ``test_fraction`` share of ``data``, scored at the end of training)."""
    from ..data.mixture import add_system_prompt, load_eval_data, load_sources, sources_of
    from ..data.preferences import split_holdout, split_test
    from ..data.templating import tokenize_pairs

    if test:
        if cfg.test_fraction <= 0:
            raise UserError("--test: test_fraction is 0 (the run kept no test split); give --test-fraction")
        data = load_sources(sources_of(cfg), cfg.strict, cfg.seed)
        _, held = split_test(data.pairs, cfg.test_fraction)
        why = f"test_fraction {cfg.test_fraction}"
    elif cfg.eval_data:  # an evaluation file: all of it, the training data is not read
        data = load_eval_data(cfg)
        held, why = list(data.pairs), "the evaluation data"
    else:
        if cfg.eval_fraction <= 0:
            raise UserError("eval_fraction: 0 holds nothing out, so there is nothing to evaluate (or give --eval-data)")
        data = load_sources(sources_of(cfg), cfg.strict, cfg.seed)
        _, held = split_holdout(data.pairs, cfg.eval_fraction)
        why = f"eval_fraction {cfg.eval_fraction}"
    held = add_system_prompt(held, cfg.system_prompt)
    tokenized, stats = tokenize_pairs(held, tokenizer, cfg.max_length, cfg.max_prompt_length, progress=False)
    if cfg.eval_max_pairs:
        tokenized = tokenized[: cfg.eval_max_pairs]
    if not tokenized:
        raise UserError(f"{data.source}: no held-out pair survived tokenisation ({why})")
    return tokenized, {
        "data": data.source, "held_out": len(held), "evaluated": len(tokenized),
        "dropped": len(stats.dropped_rows), "truncated": stats.truncated, **({"split": "test"} if test else {}),
    }, held


def run_evaluation(
    cfg: OrpoConfig, adapter: str | Path | None = None, force: bool = False, progress: bool = True,
    test: bool = False,
) -> dict[str, Any]:
    """Load once, evaluate the base and (with ``adapter``) base + adapter on every held-out pair.

    Returns ``{"settings", "pairs", "base", "adapter", "change", "health"}``; ``adapter`` and
    ``change`` are None without an adapter, ``health`` (``health.health_side_by_side``, or the
    base's alone) is None when ``cfg.health_prompts`` is 0.
    """
    from ..evaluation.health import generation_health, health_side_by_side, select_prompts
    from ..export.adapters import adapter_tokenizer_dir

    tokenizer_dir = adapter_tokenizer_dir(adapter) if adapter is not None else None
    model, tokenizer, device = load_base_for_evaluation(cfg, tokenizer_dir)
    if adapter is not None:
        model = attach_adapter(model, tokenizer, adapter, force=force)
        model.eval()
    pairs, where, held = heldout_pairs(cfg, tokenizer, test)
    results = evaluate_base_and_adapter(
        model, pairs, cfg.beta, tokenizer.pad_token_id, device=device, batch_size=cfg.eval_batch_size,
        chunk_size=cfg.logits_chunk_size, nll_over_prompt=cfg.nll_over_prompt, progress=progress,
        pad_to_multiple_of=cfg.pad_to_multiple_of, shared=cfg.step in ("shared", "auto"),
        pack_tokens=row_tokens(cfg),
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
    from ..export.adapters import AdapterError, parse_card, refuse_links_out

    values: dict[str, Any] = {}
    if adapter.is_dir():
        refuse_links_out(adapter)  # before the card is read: a link out is refused, not followed
    card = adapter / "README.md"
    if card.is_file():

        try:
            training = parse_card(card.read_text(encoding="utf-8"), card)["qlora_orpo"].get("training") or {}
        except (AdapterError, OSError, UnicodeDecodeError):
            training = {}
        values = dict(training) if isinstance(training, dict) else {}
    elif (adapter.parent / "config.yaml").is_file():
        values = OrpoConfig.read_file(adapter.parent / "config.yaml")
    # The card names the base and the data without their local paths; the record beside the
    # adapter (export/adapters.local_record) has them on the machine that trained it.
    from ..export.adapters import local_record
    from ..export.card import public_tree

    local = local_record(adapter)
    for field, part in (("model", "base"), ("data", "data"), ("eval_data", "data")):
        given = (local.get(part) or {}).get(field)
        if values and given and public_tree(given) == values.get(field):  # the card names this one
            values[field] = given
    # The device is this machine's business, not the training machine's; and every held-out
    # pair is evaluated unless --max-pairs says otherwise (older runs capped theirs at 64).
    return {k: v for k, v in values.items() if k in EVAL_FIELDS and k not in ("device", "eval_max_pairs")}

