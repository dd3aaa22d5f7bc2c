"""The optimizer and its learning-rate schedule, and how many optimizer steps a run takes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import OrpoConfig
from ..core.errors import UserError


def total_optimizer_steps(cfg: OrpoConfig, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, or enough for ``epochs`` passes over ``n_train`` pairs.

    Each optimizer step consumes ``batch_size * grad_accum`` pairs on every one of the
    ``world_size`` data-parallel ranks, so N ranks pass over the data N times as fast.
    """
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * max(1, world_size)
    return max(1, math.ceil(cfg.epochs * n_train / per_step))


def lr_lambda(cfg: OrpoConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine or linear decay to 0 (or constant)."""
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(cfg: OrpoConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if device.type != "cuda":
        raise UserError(f"optim: {cfg.optim} needs a CUDA device (this run is on {device}); use --optim adamw")
    import bitsandbytes as bnb

    kind = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return kind(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
