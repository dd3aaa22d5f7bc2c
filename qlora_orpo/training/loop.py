"""The training loop: optimizer steps over a stream of micro-batches, and nothing else.

No tensor maths here (forward and backward are ``step.OrpoStep``'s, the loss ``loss.py``'s),
and nothing of what happens around training: evaluation, the checkpoint policy and the
end-of-run actions reach the loop from the recipe (``recipes/finetune.py``) as
:class:`LoopHooks`. ``.item()`` (a device sync) happens only at log points, except one
finiteness check per micro-batch so that a NaN never reaches the weights.

:func:`prepare` builds the :class:`Trainer` (optimizer, schedule, loss scaler, step function,
the state restored from a checkpoint); :func:`fit` runs it to ``trainer.total_steps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import OrpoConfig, row_tokens
from ..core.console import console_logger
from ..core.errors import TrainingError
from ..data.collate import PairBatch, TokenizedPair
from ..models.memory import format_memory, peak_memory, reset_peak_memory
from . import distributed
from .checkpoint import RngSnapshot, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_lambda, total_optimizer_steps
from .resume import check_data_fingerprint, data_fingerprint, deferred_interrupt
from .sharded_state import ShardedModel
from .step import OrpoStep, SideForward
from .step_choice import StepChooser, chooser_for

_console = console_logger()


def log(message: str) -> None:
    if distributed.is_main_process():  # one copy of each line, not one per rank
        _console(message)


@dataclass
class Trainer:
    """Everything an optimizer step touches: the step function, the optimizer and its schedule, the state."""

    cfg: OrpoConfig
    model: torch.nn.Module
    step_fn: OrpoStep
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: TrainState
    total_steps: int
    dist: distributed.Dist
    device: torch.device
    run_dir: Path
    source: str  # the training data, named in errors
    sharded: ShardedModel | None = None  # FSDP2: what reads the weights whole runs on every rank
    chooser: StepChooser | None = None  # --step auto

    def save(self, rng: RngSnapshot | None = None) -> Path | None:
        """A checkpoint of the last completed step (``rng``: that step's end); rank 0 writes, every rank gathers."""
        full = self.sharded.full_state(self.optimizer) if self.sharded is not None else None  # a collective
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                               keep=self.cfg.save_total_limit, rng=rng, full=full)

    def update(self, rows: list[int]) -> torch.Tensor:
        """Clip, step the optimizer and the schedule, count the step; returns the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.max_grad_norm or float("inf")
        grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(self.params, clip))
        # A finite loss can still give a non-finite gradient (the split step's rejected
        # pass is checked by nothing else): it must never reach the weights. Under float16
        # loss scaling an overflow is expected, and the scaler skips that step itself.
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            raise TrainingError(
                f"non-finite gradient norm ({float(grad_norm)}) at step {self.state.step + 1}, pair rows {rows} of "
                f"{self.source}; the weights were not updated; last good checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none'}"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm


@dataclass
class LoopHooks:
    """What the recipe plugs into the loop; the loop calls each at its moment and knows nothing of them."""

    evaluate: Callable[[int], Any] | None = None  # every eval_every steps, except the last (the recipe's job)
    save: Callable[[RngSnapshot | None], Path | None] | None = None  # every save_every steps and on Ctrl-C
    on_step_end: Callable[[int], None] | None = None


def prepare(
    cfg: OrpoConfig, model: torch.nn.Module, pad_token_id: int, compute_dtype: torch.dtype, device: torch.device,
    train_pairs: list[TokenizedPair], dist: distributed.Dist, run_dir: Path, source: str,
    checkpoint: Path | None = None,
) -> Trainer:
    """The trainer for ``model`` on ``train_pairs``, its state restored from ``checkpoint`` when given."""
    side_forward = dist.wrap(SideForward(model, cfg.logits_chunk_size, cfg.nll_over_prompt), device)
    sharded = ShardedModel(model, side_forward) if dist.sharded else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device)
    total_steps = total_optimizer_steps(cfg, len(train_pairs), dist.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = TrainState()
    fingerprint = data_fingerprint(train_pairs)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, sharded)
        check_data_fingerprint(state.data_fingerprint, fingerprint, source, checkpoint)
    state.data_fingerprint = fingerprint
    # float16 compute (GPUs without native bfloat16) needs loss scaling; a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16 and device.type == "cuda")
    dist.check_loss_scaling(scaler.is_enabled())
    chooser = chooser_for(cfg, model, device, dist.agree_on_step_mode) if cfg.step == "auto" else None
    step_fn = OrpoStep(
        model, cfg.beta, cfg.step, cfg.logits_chunk_size, cfg.nll_over_prompt, pad_token_id, device,
        backward=lambda loss: scaler.scale(loss).backward(), choose=chooser,
        forward=side_forward, no_sync=dist.no_sync(side_forward), pack_tokens=row_tokens(cfg),
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    return Trainer(cfg, model, step_fn, params, optimizer, scheduler, scaler, state, total_steps, dist, device,
                   run_dir, source, sharded, chooser)


def fit(trainer: Trainer, batches: Iterator[PairBatch], metrics_log: MetricsLogger, hooks: LoopHooks) -> dict[str, float]:
    """Optimizer steps until ``trainer.total_steps``; returns the last train record logged.

    Ctrl-C (or an interrupt on any FSDP2 rank) saves the last completed step and re-raises.
    """
    cfg, state, dist = trainer.cfg, trainer.state, trainer.dist
    window, last = _start(trainer, metrics_log), {}
    step_end_rng = RngSnapshot.capture()  # the RNG at the last completed step's end: what an interrupt restores
    try:
        while state.step < trainer.total_steps:
            sums: dict[str, torch.Tensor] = {}
            rows: list[int] = []
            step_tokens = 0
            dist.seed_step(cfg.seed, state.step)
            for i in range(cfg.grad_accum):
                out = trainer.step_fn(next(batches), loss_scale=1.0 / cfg.grad_accum,
                                      sync_grads=i == cfg.grad_accum - 1)
                if dist.interrupted():  # FSDP2: Ctrl-C on any rank stops every rank here, together
                    raise KeyboardInterrupt
                if not torch.isfinite(out.loss):  # one sync per micro-batch: a NaN must not reach the weights
                    raise TrainingError(
                        f"non-finite loss ({float(out.loss)}) at step {state.step + 1}, pair rows {out.rows} of "
                        f"{trainer.source}; last good checkpoint: {latest_checkpoint(trainer.run_dir) or 'none'}"
                    )
                rows += out.rows
                for key, value in {"loss": out.loss, **out.metrics}.items():
                    sums[key] = sums.get(key, 0) + value / cfg.grad_accum
                step_tokens += out.num_tokens
            step_tokens, sums = dist.reduce_step(step_tokens, sums)
            # From here to the counters the update is all or nothing: Ctrl-C waits for its end.
            with deferred_interrupt():
                grad_norm = trainer.update(rows)
                # Counted only now that their gradients are in the weights, over all ranks (see micro_batches).
                state.micro_batches += cfg.grad_accum * dist.world_size
                state.tokens += step_tokens
                step_end_rng = RngSnapshot.capture()
            window.tokens += step_tokens
            metrics_log.advance(1)
            if state.step % cfg.log_every == 0 or state.step == trainer.total_steps:
                last = window.log(trainer, metrics_log, sums, grad_norm)
            before_the_end = state.step < trainer.total_steps
            if hooks.evaluate is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and before_the_end:
                hooks.evaluate(state.step)
            if hooks.save is not None and cfg.save_every and state.step % cfg.save_every == 0 and before_the_end:
                hooks.save(None)
            if hooks.on_step_end is not None:
                hooks.on_step_end(state.step)
    except KeyboardInterrupt:
        _save_on_interrupt(trainer, metrics_log, hooks, step_end_rng)
        raise
    finally:  # also on an error: its one line must start a line, not follow the bar's
        metrics_log.close_progress()
    return last


def _start(trainer: Trainer, metrics_log: MetricsLogger) -> _LogWindow:
    reset_peak_memory(trainer.device)
    trainer.model.train()
    metrics_log.start_progress(trainer.total_steps, initial=trainer.state.step)
    return _LogWindow(trainer.state.step)


class _LogWindow:
    """The steps since the last log point: log_every of them, except the last window (total_steps need
    not be a multiple) and the first after a resume (from the checkpoint's step)."""

    def __init__(self, from_step: int):
        self.tokens, self.start, self.from_step = 0, time.perf_counter(), from_step

    def log(self, trainer: Trainer, metrics_log: MetricsLogger, sums: dict[str, torch.Tensor],
            grad_norm: torch.Tensor) -> dict[str, float]:
        state = trainer.state
        elapsed = time.perf_counter() - self.start
        memory = peak_memory(trainer.device)
        record = {
            "step": state.step, "split": "train", **{k: float(v) for k, v in sums.items()},
            "grad_norm": float(grad_norm), "lr": trainer.scheduler.get_last_lr()[0],
            "tokens_per_s": self.tokens / elapsed, "seconds_per_step": elapsed / (state.step - self.from_step),
            "tokens": state.tokens, **memory,
        }
        metrics_log.log(record, postfix=f"loss {record['loss']:.3f} acc {record['reward_accuracy']:.2f} "
                                        f"{record['tokens_per_s']:.0f} tok/s {format_memory(memory)}")
        self.tokens, self.start, self.from_step = 0, time.perf_counter(), state.step
        return record


def _save_on_interrupt(trainer: Trainer, metrics_log: MetricsLogger, hooks: LoopHooks, rng: RngSnapshot) -> None:
    """The state of the last completed step: an unfinished accumulation's micro-batches are not
    counted (their gradients never reached the weights) and its RNG draws are undone."""
    metrics_log.close_progress()
    path = hooks.save(rng) if hooks.save is not None else None
    log(f"interrupted: saved {path} (step {trainer.state.step}); continue with --resume --run-name "
        f"{trainer.run_dir.name} --output-dir {trainer.cfg.output_dir}")
    metrics_log.close()  # (other errors leave the sinks as they are: every record is already flushed)
