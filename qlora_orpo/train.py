"""The training loop behind ``scripts/finetune.py``: schedule, cadence, logging, checkpoints.

No tensor maths here: forward and backward belong to ``step.OrpoStep``, the loss to
``loss.py``, evaluation to ``evaluate.py``. ``.item()`` (a device sync) happens only at log
points, except one finiteness check per optimizer step so a NaN never reaches the weights.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import RngSnapshot, TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .collate import TokenizedPair, collate_pairs
from .config import OrpoConfig
from .data import load_from_config, split_holdout
from .errors import TrainingError, UserError
from .memory import apply_cpu_allocator_policy, format_memory, peak_memory, reset_peak_memory
from .metrics import MetricsLogger, console_logger
from .resume import check_data_fingerprint, data_fingerprint, deferred_interrupt, resume_config
from .run_eval import RunEvaluator
from .sharded_state import ShardedModel
from .step import OrpoStep, SideForward
from .step_choice import chooser_for
from .templating import tokenize_pairs

_console = console_logger()


def log(message: str) -> None:
    if distributed.is_main_process():  # one copy of each line, not one per rank
        _console(message)


def resolve_run_dir(cfg: OrpoConfig, resume: bool) -> Path:
    root = Path(cfg.output_dir)
    if cfg.run_name:
        return root / cfg.run_name
    if resume:
        runs = sorted((p for p in root.glob("*") if latest_checkpoint(p)), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no run with a checkpoint in {root}")
        return runs[-1]
    return root / datetime.now().strftime("orpo-%Y%m%d-%H%M%S")


def total_optimizer_steps(cfg: OrpoConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


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


def micro_batches(
    pairs: list[TokenizedPair], batch_size: int, seed: int, start: int, pad_token_id: int, pad_to_multiple_of: int = 1,
    world_size: int = 1, rank: int = 0,
) -> Iterator[Any]:
    """Endless stream of collated micro-batches, reshuffled each epoch from ``seed + epoch``.

    ``start`` skips that many micro-batches, so a resumed run sees exactly the batches it
    would have seen; the order depends only on (seed, epoch), never on earlier randomness.
    Under ``world_size`` ranks, ``start`` counts micro-batches of all ranks together and
    rank ``rank`` takes every ``world_size``-th of the one global stream, so a run can
    resume under another number of ranks (the pairs are then dealt out differently).
    """
    per_epoch = max(1, len(pairs) // batch_size)  # the short tail of an epoch is dropped
    index, epoch_of_order, order = start + rank, -1, []
    while True:
        epoch, position = divmod(index, per_epoch)
        if epoch != epoch_of_order:
            order = list(range(len(pairs)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            epoch_of_order = epoch
        chosen = [pairs[i] for i in order[position * batch_size : (position + 1) * batch_size]]
        yield collate_pairs(chosen, pad_token_id, pad_to_multiple_of)
        index += world_size


def _to_float(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def given_fields(cfg: OrpoConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from the defaults: what an API caller set, for a resume."""
    default = OrpoConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def run(
    cfg: OrpoConfig,
    resume: bool = False,
    on_step_end: Callable[[int], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the summary that is also logged. See ``qlora-orpo train --help``.

    With ``resume`` the run's recorded config is used, changed only by ``overrides`` (the
    values the user set; default: the fields of ``cfg`` that differ from the defaults) in
    the fields :data:`resume.RESUMABLE_FIELDS` allows. Under ``torchrun``/``accelerate
    launch`` every rank runs this: data-parallel, with rank 0 alone writing the run
    directory (``distributed.py``).
    """
    from .model import select_device

    dist = distributed.init(select_device(cfg.device))
    try:
        with dist.interrupts_at_micro_batch_ends():  # FSDP2: see _train's loop
            summary = _train(cfg, resume, on_step_end, overrides, dist)
        # Every rank past its last collective before the group goes: tearing gloo down while
        # another rank's work is in flight aborts that process ("terminate called ...").
        dist.barrier()
        return summary
    finally:
        dist.shutdown()


def _train(
    cfg: OrpoConfig,
    resume: bool,
    on_step_end: Callable[[int], None] | None,
    overrides: dict[str, Any] | None,
    dist: distributed.Dist,
) -> dict[str, Any]:
    from .model import load_model_for_training, select_device

    # The CPU allocator policy (jemalloc re-exec, glibc tuning) is for CPU runs only.
    on_cpu = select_device(cfg.device).type == "cpu"
    allocator = apply_cpu_allocator_policy(cfg.cpu_allocator) if on_cpu else "CUDA caching allocator"
    run_dir = Path(dist.broadcast_text(str(resolve_run_dir(cfg, resume))))  # rank 0's timestamp
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume:
        if checkpoint is None:
            raise UserError(f"--resume: {run_dir} has no complete checkpoint")
        # The run's own config, not today's defaults; only schedule-independent fields may change.
        cfg, changes = resume_config(run_dir, given_fields(cfg) if overrides is None else overrides)
        log(f"resuming {run_dir} from {checkpoint.name}" + (f"; changed {'; '.join(changes)}" if changes else ""))
    elif (run_dir / "checkpoints").exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")
    dist.check_export(cfg.export)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_file(run_dir / "config.yaml")
    dist.barrier()  # no rank reads the run directory while rank 0 writes it
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # -- data ---------------------------------------------------------------------------------
    data = load_from_config(cfg)
    train_pairs, eval_pairs = split_holdout(data.pairs, cfg.eval_fraction)
    log(f"data: {data.source} ({data.shape}): {len(data.pairs)} pairs, {len(data.skipped)} rows skipped")
    for reason, count in data.skip_reasons().items():
        log(f"  skipped {count} x {reason}")

    # -- model --------------------------------------------------------------------------------
    model, tokenizer, info = load_model_for_training(cfg)
    log(f"model: {info.describe()}; allocator: {allocator}")
    train_tok, train_stats = tokenize_pairs(train_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_tok, _ = tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if cfg.eval_max_pairs:
        eval_tok = eval_tok[: cfg.eval_max_pairs]
    if not train_tok:
        raise UserError("no training pair survived tokenisation (check max_length and max_prompt_length)")
    log(f"tokenised: {len(train_tok)} train pairs ({train_stats.truncated} truncated, "
        f"{len(train_stats.dropped_rows)} dropped), {len(eval_tok)} eval pairs")
    if train_stats.system_folded:
        log(f"  the chat template refuses a system turn: folded it into the first user turn in "
            f"{train_stats.system_folded} train prompts")

    device = info.device
    if dist.enabled:
        log(f"distributed: {dist.world_size} ranks, {dist.sharding}, {torch.distributed.get_backend()}")
    side_forward = dist.wrap(SideForward(model, cfg.logits_chunk_size, cfg.nll_over_prompt), device)
    # FSDP2: what reads the weights whole (checkpoints, evaluation, the adapter) runs on every rank.
    sharded = ShardedModel(model, side_forward) if dist.sharded else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device)
    total_steps = total_optimizer_steps(cfg, len(train_tok))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = TrainState()
    fingerprint = data_fingerprint(train_tok)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, sharded)
        check_data_fingerprint(state.data_fingerprint, fingerprint, data.source, checkpoint)
    state.data_fingerprint = fingerprint
    metrics_log = (
        MetricsLogger(run_dir, cfg.report_to, resume_step=state.step if resume else None, config=cfg.to_dict())
        if dist.is_main else distributed.NullLog()
    )
    # float16 compute (GPUs without native bfloat16) needs loss scaling; a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=info.compute_dtype == torch.float16 and device.type == "cuda")
    dist.check_loss_scaling(scaler.is_enabled())
    chooser = chooser_for(cfg, model, device, dist.agree_on_step_mode) if cfg.step == "auto" else None
    step_fn = OrpoStep(
        model, cfg.beta, cfg.step, cfg.logits_chunk_size, cfg.nll_over_prompt, tokenizer.pad_token_id, device,
        backward=lambda loss: scaler.scale(loss).backward(), choose=chooser,
        forward=side_forward, no_sync=dist.no_sync(side_forward),
    )

    def save(rng: RngSnapshot | None = None) -> Path | None:
        full = sharded.full_state(optimizer) if sharded is not None else None  # a collective: every rank
        return save_checkpoint(run_dir, model, optimizer, scheduler, state, keep=cfg.save_total_limit, rng=rng,
                               full=full) if dist.is_main else None

    # Before/periodic/after evaluations, health checks and best-checkpoint selection: run_eval.py.
    # Under DDP the weights are equal on every rank and rank 0 alone evaluates; under FSDP2 all do.
    evaluates = dist.is_main or sharded is not None
    evaluator = RunEvaluator(model, tokenizer, cfg, eval_tok if evaluates else [], eval_pairs, device, run_dir,
                             metrics_log, log, source=str(data.source), resumed_step=state.step, sharded=sharded,
                             writes=dist.is_main)
    before = evaluator.before(state.step) if state.step == 0 and evaluates else None
    batches = micro_batches(
        train_tok, cfg.batch_size, cfg.seed, state.micro_batches, tokenizer.pad_token_id, cfg.pad_to_multiple_of,
        dist.world_size, dist.rank,
    )
    reset_peak_memory(device)
    model.train()
    metrics_log.start_progress(total_steps, initial=state.step)
    # A log window runs from window_from to the logged step: log_every steps, except the last one
    # (total_steps need not be a multiple) and the first after a resume (from the checkpoint's step).
    window_tokens, window_start, window_from = 0, time.perf_counter(), state.step
    last: dict[str, float] = {}
    # The RNG at the last completed step's end: what an interrupted step's checkpoint restores.
    step_end_rng = RngSnapshot.capture()
    try:
        while state.step < total_steps:
            sums: dict[str, torch.Tensor] = {}
            rows: list[int] = []
            step_tokens = 0
            dist.seed_step(cfg.seed, state.step)
            for i in range(cfg.grad_accum):
                out = step_fn(next(batches), loss_scale=1.0 / cfg.grad_accum, sync_grads=i == cfg.grad_accum - 1)
                if dist.interrupted():  # FSDP2: Ctrl-C on any rank stops every rank here, together
                    raise KeyboardInterrupt
                if not torch.isfinite(out.loss):  # one sync per micro-batch: a NaN must not reach the weights
                    raise TrainingError(
                        f"non-finite loss ({float(out.loss)}) at step {state.step + 1}, pair rows {out.rows} of "
                        f"{data.source}; last good checkpoint: {latest_checkpoint(run_dir) or 'none'}"
                    )
                rows += out.rows
                for key, value in {"loss": out.loss, **out.metrics}.items():
                    sums[key] = sums.get(key, 0) + value / cfg.grad_accum
                step_tokens += out.num_tokens
            step_tokens, sums = dist.reduce_step(step_tokens, sums)
            # From here to the counters the update is all or nothing: Ctrl-C waits for its end.
            with deferred_interrupt():
                grad_norm = _update(cfg, state, scaler, optimizer, scheduler, params, rows, data, run_dir)
                # Counted only now that their gradients are in the weights, over all ranks (see micro_batches).
                state.micro_batches += cfg.grad_accum * dist.world_size
                state.tokens += step_tokens
                step_end_rng = RngSnapshot.capture()
            window_tokens += step_tokens
            metrics_log.advance(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_start
                memory = peak_memory(device)
                last = {
                    "step": state.step, "split": "train", **_to_float(sums),
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / elapsed, "seconds_per_step": elapsed / (state.step - window_from),
                    "tokens": state.tokens, **memory,
                }
                metrics_log.log(last, postfix=f"loss {last['loss']:.3f} acc {last['reward_accuracy']:.2f} "
                                    f"{last['tokens_per_s']:.0f} tok/s {format_memory(memory)}")
                window_tokens, window_start, window_from = 0, time.perf_counter(), state.step
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps and evaluates:
                evaluator.periodic(state.step)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                save()
            if on_step_end is not None:
                on_step_end(state.step)
    except KeyboardInterrupt:
        metrics_log.close_progress()
        # The state of the last completed step: an unfinished accumulation's micro-batches are
        # not counted (their gradients never reached the weights) and its RNG draws are undone.
        path = save(rng=step_end_rng)
        log(f"interrupted: saved {path} (step {state.step}); continue with --resume --run-name {run_dir.name}"
            f" --output-dir {cfg.output_dir}")
        metrics_log.close()  # (other errors leave the sinks as they are: every record is already flushed)
        raise
    metrics_log.close_progress()
    of_rank = {"run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens, "rank": dist.rank}
    if not evaluates:
        return of_rank
    save()
    after, evaluation = evaluator.finish(state.step)
    adapter_dir = save_final_adapter(model, tokenizer, cfg, run_dir, data, after, evaluation, sharded)
    if not dist.is_main:
        return of_rank
    summary = {
        "run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens, "adapter": str(adapter_dir),
        "trainable_params": info.trainable_params, "total_params": info.total_params,
        "final_train": last, "eval_before": before, "eval_after": after,
    }
    metrics_log.log({"step": state.step, "split": "summary", **{k: v for k, v in summary.items() if k != "final_train"}})
    describe = f"done: {state.step} steps, {state.tokens} tokens, adapter in {adapter_dir}"
    if before and after:
        describe += (f"; held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
                     f"margin {before['reward_margin']:+.4f} -> {after['reward_margin']:+.4f}")
    log(describe)
    if chooser is not None:
        log(chooser.describe())
    metrics_log.close()
    if cfg.export == "merged":
        from .export import export_merged

        export_merged(adapter_dir, run_dir / "merged")
    elif cfg.export == "gguf":
        from .gguf_export import export_gguf

        export_gguf(adapter_dir, run_dir / "gguf" / f"{run_dir.name}-{cfg.gguf_quant}.gguf", cfg.gguf_quant)
    _write_plots(run_dir)
    return summary


def _update(cfg, state, scaler, optimizer, scheduler, params, rows, data, run_dir) -> torch.Tensor:
    """Clip, step the optimizer and the schedule, count the step; returns the gradient norm."""
    scaler.unscale_(optimizer)
    grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    # A finite loss can still give a non-finite gradient (the split step's rejected
    # pass is checked by nothing else): it must never reach the weights. Under float16
    # loss scaling an overflow is expected, and the scaler skips that step itself.
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):
        raise TrainingError(
            f"non-finite gradient norm ({float(grad_norm)}) at step {state.step + 1}, pair rows {rows} of "
            f"{data.source}; the weights were not updated; last good checkpoint: "
            f"{latest_checkpoint(run_dir) or 'none'}"
        )
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return grad_norm


def save_final_adapter(
    model, tokenizer, cfg: OrpoConfig, run_dir: Path, data, metrics: dict | None, evaluation: dict | None = None,
    sharded: ShardedModel | None = None,
) -> Path | None:
    """The final adapter in peft format, with a card carrying the base's fingerprint and the evaluation.

    ``sharded``: every rank calls this to gather the weights; rank 0 writes (the others get None).
    """
    from .adapters import save_adapter

    def write(state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        return save_adapter(model, tokenizer, cfg, run_dir / "adapter", data=data, metrics=metrics,
                            evaluation=evaluation, state_dict=state_dict)

    return write() if sharded is None else sharded.write_whole(write)


def _write_plots(run_dir: Path) -> None:
    try:
        from .plots import plot_run
    except ImportError:
        return
    plot_run(run_dir)
