"""The base model's evaluation, cached: its held-out scores and greedy health replies, computed once.

Every run evaluates the untrained base on the held-out pairs and answers the health prompts
with it; on a CPU that is most of a short run's wall time, and it depends only on the base,
the held-out pairs and the evaluation settings. The key (:func:`cache_key`) hashes exactly
those: the base's fingerprint (architecture, vocabulary, embeddings), the tokenised held-out
pairs, the health prompts, the chat template and stop tokens, and every setting that changes a
score's bits (compute dtype as resolved, device type, batch size, padding, chunking, NLL span,
reply length) plus the torch and package versions. ``beta`` is not in it: the per-pair
log-probs are cached and the metrics are recomputed from them.

Entries are JSON files under ``<cache>/eval/`` (``$QLORA_ORPO_CACHE``, else
``~/.cache/qlora_orpo``), written atomically; float64 scores round-trip exactly through JSON.
A missing, unreadable or mismatched entry is a miss, and a failed write only a log line:
the cache can never change a result, only skip recomputing it. ``--no-eval-cache`` bypasses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_text
from .health import HealthResult, Reply
from .scoring import PairScores

CACHE_VERSION = 1
EVAL_CACHE_ENV = "QLORA_ORPO_EVAL_CACHE"
SCORE_FIELDS = ("chosen_logps", "rejected_logps", "chosen_nll")


def cache_dir() -> Path:
    """``$QLORA_ORPO_EVAL_CACHE`` if set (the tests give each test its own), else ``<cache>/eval``."""
    import os

    from ..models.embedded import cache_root

    env = os.environ.get(EVAL_CACHE_ENV)
    return Path(env).expanduser() if env else cache_root() / "eval"


def cache_key(model: torch.nn.Module, tokenizer, cfg: Any, pairs: list, prompts: list, device: torch.device) -> str:
    """The hex key of the base's evaluation on ``pairs`` (tokenised) and health ``prompts`` under ``cfg``."""
    from .. import __version__
    from ..data.templating import stop_token_ids
    from ..models.fingerprint import fingerprint
    from ..models.loader import resolve_compute_dtype

    digest = hashlib.sha256()
    for pair in pairs:  # the ids say everything tokenisation decided: template, lengths, truncation
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    settings = {
        "version": CACHE_VERSION, "package": __version__, "torch": torch.__version__,
        "base": fingerprint(model, tokenizer), "pairs": digest.hexdigest(), "prompts": [list(p) for p in prompts],
        "chat_template": getattr(tokenizer, "chat_template", None), "stop": stop_token_ids(tokenizer),
        "compute_dtype": str(resolve_compute_dtype(cfg.compute_dtype, device)), "device": device.type,
        **{name: getattr(cfg, name) for name in ("quant", "nll_over_prompt", "logits_chunk_size", "eval_batch_size",
                                                 "pad_to_multiple_of", "health_max_new_tokens")},
        # The base is measured through the fresh adapter: exact for LoRA (B = 0), not bit-exact for DoRA.
        "use_dora": bool(getattr(cfg, "use_dora", False)),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def load(key: str) -> tuple[PairScores, HealthResult | None] | None:
    """The cached scores and health of ``key``, or None on any miss."""
    path = cache_dir() / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") != key:
            return None
        scores = PairScores(*(torch.tensor(entry["scores"][name], dtype=torch.float64) for name in SCORE_FIELDS))
        health = entry.get("health")
        if health is not None:
            health = HealthResult(health["metrics"], health["prompts"], [Reply(**r) for r in health["replies"]])
        return scores, health
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, scores: PairScores, health: HealthResult | None) -> Path | None:
    """Write the entry of ``key``; returns its path, or None when it could not be written."""
    path = cache_dir() / f"{key}.json"
    entry = {
        "key": key,
        "scores": {name: getattr(scores, name).double().tolist() for name in SCORE_FIELDS},
        "health": health.to_dict() if health is not None else None,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry) + "\n")
    except OSError:
        return None
    return path
