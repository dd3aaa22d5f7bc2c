"""The ORPO fine-tuning recipe behind ``qlora-orpo train``: one run wired from the layers, top to bottom.

    open the run directory (or the run to resume) -> load the data, hold out a share
    -> load the 4-bit base with LoRA -> tokenise -> prepare the trainer
    -> evaluate the base -> fit (periodic evaluation and checkpoints as hooks)
    -> final checkpoint -> evaluate, select the best healthy checkpoint -> save the adapter
    -> summary -> export (merged or GGUF) -> plots

Each arrow is a call into a layer below (``data``, ``models``, ``training``, ``evaluation``,
``export``); the loop itself (``training/loop.py``) knows nothing of evaluation or export.
Under ``torchrun``/``accelerate launch`` every rank runs this: data-parallel, with rank 0
alone writing the run directory (``training/distributed.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import OrpoConfig
from ..core.errors import UserError
from ..core.runlock import RunLock
from ..data.collate import TokenizedPair
from ..data.mixture import RunData, describe_shared, held_out_source, load_run_data, shared_pairs
from ..data.preferences import PreferenceData
from ..data.sampling import micro_batches
from ..data.templating import tokenize_pairs
from ..evaluation.run_evaluator import RunEvaluator
from ..models.memory import apply_cpu_allocator_policy
from ..training import distributed
from ..training.checkpoint import latest_checkpoint, resumable_checkpoint
from ..training.loop import LoopHooks, Trainer, fit, log, prepare
from ..training.metrics import MetricsLogger
from ..training.resume import resume_config
from ..training.sharded_state import ShardedModel

# What a run writes into its directory first: any of them there means a run was started in it.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def run(
    cfg: OrpoConfig,
    resume: bool = False,
    on_step_end: Callable[[int], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the summary that is also logged. See ``qlora-orpo train --help``.

    With ``resume`` the run's recorded config is used, changed only by ``overrides`` (the
    values the user set; default: the fields of ``cfg`` that differ from the defaults) in
    the fields :data:`training.resume.RESUMABLE_FIELDS` allows. Under ``torchrun``/``accelerate
    launch`` every rank runs this: data-parallel, with rank 0 alone writing the run
    directory (``training/distributed.py``).
    """
    from ..models.loader import select_device

    dist = distributed.init(select_device(cfg.device))
    try:
        # held: the run directory's lock (rank 0), released when the run ends however it ends.
        with contextlib.ExitStack() as held, dist.interrupts_at_micro_batch_ends():  # FSDP2: see training/loop.fit
            summary = _finetune(cfg, resume, on_step_end, overrides, dist, held)
        # Every rank past its last collective before the group goes: tearing gloo down while
        # another rank's work is in flight aborts that process ("terminate called ...").
        dist.barrier()
        return summary
    finally:
        dist.shutdown()


def _finetune(
    cfg: OrpoConfig,
    resume: bool,
    on_step_end: Callable[[int], None] | None,
    overrides: dict[str, Any] | None,
    dist: distributed.Dist,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    from ..models.loader import load_model_for_training, select_device

    # The CPU allocator policy (jemalloc re-exec, glibc tuning) is for CPU runs only.
    on_cpu = select_device(cfg.device).type == "cpu"
    allocator = apply_cpu_allocator_policy(cfg.cpu_allocator) if on_cpu else "CUDA caching allocator"
    # A new run reads its data before it makes its directory: a bad --data writes nothing. A
    # resume reads the data its recorded config names.
    loaded = None if resume else load_data(cfg)
    cfg, run_dir, checkpoint = open_run(cfg, resume, overrides, dist, held)
    loaded = loaded or load_data(cfg)
    data, train_pairs, eval_pairs = loaded.data, loaded.train, loaded.held_out
    model, tokenizer, info = load_model_for_training(cfg)
    log(f"model: {info.describe()}; allocator: {allocator}")
    train_tok, eval_tok = tokenise(cfg, tokenizer, train_pairs, eval_pairs)
    test_tok, _ = tokenize_pairs(loaded.test, tokenizer, cfg.max_length, cfg.max_prompt_length, progress=False)
    if dist.enabled:
        log(f"distributed: {dist.world_size} ranks, {dist.sharding}, {torch.distributed.get_backend()}; "
            f"a rank waits up to {distributed.collective_timeout()} in a collective (QLORA_ORPO_COLLECTIVE_TIMEOUT_S)")
    trainer = prepare(cfg, model, tokenizer.pad_token_id, info.compute_dtype, info.device, train_tok, dist,
                      run_dir, str(data.source), checkpoint)
    step = trainer.state.step
    metrics_log = (
        MetricsLogger(run_dir, cfg.report_to, resume_step=resume_step(resume, checkpoint, step), config=cfg.to_dict())
        if dist.is_main else distributed.NullLog()
    )
    # Before/periodic/after evaluations, health checks and best-checkpoint selection: run_evaluator.py.
    # Under DDP the weights are equal on every rank and rank 0 alone evaluates; under FSDP2 all do.
    evaluates = dist.is_main or trainer.sharded is not None
    evaluator = RunEvaluator(model, tokenizer, cfg, eval_tok if evaluates else [], eval_pairs, info.device, run_dir,
                             metrics_log, log, source=held_out_source(cfg, data), resumed_step=step, sharded=trainer.sharded,
                             writes=dist.is_main)
    before = evaluator.before(step) if step == 0 and evaluates else None
    batches = micro_batches(
        train_tok, cfg.batch_size, cfg.seed, trainer.state.micro_batches, tokenizer.pad_token_id,
        cfg.pad_to_multiple_of, dist.world_size, dist.rank,
    )
    hooks = LoopHooks(evaluate=evaluator.periodic if evaluates else None, save=trainer.save, on_step_end=on_step_end)
    last = fit(trainer, batches, metrics_log, hooks)
    if not evaluates:
        return {"run_dir": str(run_dir), "steps": trainer.state.step, "tokens": trainer.state.tokens,
                "rank": dist.rank}
    return finish(trainer, evaluator, metrics_log, tokenizer, info, data, before, last, (test_tok, len(loaded.test)))


def open_run(
    cfg: OrpoConfig, resume: bool, overrides: dict[str, Any] | None, dist: distributed.Dist,
    held: contextlib.ExitStack | None = None,
) -> tuple[OrpoConfig, Path, Path | None]:
    """The run directory, created with the resolved config in it; on resume, the run's own config and checkpoint.

    Rank 0 takes the directory's lock (``core/runlock.py``) and keeps it in ``held`` (or until
    the process ends): a second run in the same directory is refused while this one trains,
    on every rank (rank 0 broadcasts its answer).
    Without ``--resume`` a directory that already holds a run (its config, metrics or
    checkpoints) is refused, even one that died before its first checkpoint; ``--resume``
    starts such a run over from step 0 with its recorded config (its old metrics dropped).
    """
    if not resume:
        dist.check_export(cfg.export)  # before anything is written (a resume checks its recorded config below)
    run_dir = Path(dist.broadcast_text(str(resolve_run_dir(cfg, resume, claim=dist.is_main))))  # rank 0's name
    refusal = ""
    if dist.is_main and (not resume or run_dir.is_dir()):  # a resume of nothing makes no directory
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            if held is not None:
                held.callback(lock.release)
        except UserError as exc:
            refusal = str(exc)
        except OSError as exc:
            refusal = f"{run_dir}: cannot create the run directory ({exc.strerror})"
    # Rank 0 alone asks for the lock; its answer reaches every rank, or the others would wait
    # for it in the next barrier until the collective timeout (hours) and then fail obscurely.
    verdict = dist.broadcast_text(f"refused:{refusal}" if refusal else "ok")  # never empty: a 0-byte broadcast
    if verdict != "ok":
        raise UserError(verdict.removeprefix("refused:"))
    # A damaged newest checkpoint (a flipped bit, a truncated file) gives way to the one before, saying so.
    checkpoint = resumable_checkpoint(run_dir, log) if resume else None
    if resume:
        if checkpoint is None and not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} has no complete checkpoint and no recorded config.yaml")
        # The run's own config, not today's defaults; only schedule-independent fields may change.
        cfg, changes = resume_config(run_dir, given_fields(cfg) if overrides is None else overrides)
        changed = f"; changed {'; '.join(changes)}" if changes else ""
        if checkpoint is None:  # it died before its first save: nothing to keep but its config
            log(f"--resume: {run_dir} stopped before its first checkpoint; starting it over from step 0 "
                f"with its recorded config{changed}")
        else:
            log(f"resuming {run_dir} from {checkpoint.name}{changed}")
    elif any((run_dir / name).exists() for name in RUN_FILES):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")
    dist.check_export(cfg.export)
    dist.barrier()  # every rank has looked at the directory before rank 0 writes its config there
    if dist.is_main:
        cfg.to_file(run_dir / "config.yaml")
    dist.barrier()  # no rank reads the run directory while rank 0 writes it
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return cfg, run_dir, checkpoint


def resume_step(resume: bool, checkpoint: Path | None, step: int) -> int | None:
    """The step after which a run's old metrics are dropped: None (a new run, nothing to drop),
    the checkpoint's step, or -1 (all of them) for a run started over before its first checkpoint."""
    if not resume:
        return None
    return step if checkpoint is not None else -1


def resolve_run_dir(cfg: OrpoConfig, resume: bool, claim: bool = True) -> Path:
    """``output_dir/run_name``; with ``--resume`` and no name, the newest run with a checkpoint;
    else a new ``orpo-<date>-<time>`` directory, created at once when ``claim`` (rank 0) so that
    two runs started in the same second cannot share it (the second gets a ``-2`` suffix, ...)."""
    root = Path(cfg.output_dir)
    if cfg.run_name:
        return root / cfg.run_name
    if resume:
        runs = sorted((p for p in root.glob("*") if latest_checkpoint(p)), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no run with a checkpoint in {root}")
        return runs[-1]
    stamp = datetime.now().strftime("orpo-%Y%m%d-%H%M%S")
    if not claim:
        return root / stamp  # another rank: rank 0's name replaces it
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()  # atomic: exactly one process creates it
            return path
        except FileExistsError:
            continue
    raise UserError(f"{root}: cannot find a free run name for {stamp}; pass --run-name")


def given_fields(cfg: OrpoConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from the defaults: what an API caller set, for a resume."""
    default = OrpoConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def load_data(cfg: OrpoConfig) -> RunData:
    """The preference data, its train and held-out pairs (a hash share, or all of ``eval_data``) and test pairs."""
    loaded = load_run_data(cfg)
    data, train_pairs, eval_pairs = loaded.data, loaded.train, loaded.held_out
    log(f"data: {data.source} ({data.shape}): {len(data.pairs)} pairs, {len(data.skipped)} rows skipped")
    if loaded.test:
        log(f"test split: {len(loaded.test)} pairs (test_fraction {cfg.test_fraction}), scored once at the end")
    for reason, count in data.skip_reasons().items():
        log(f"  skipped {count} x {reason}")
    if loaded.eval_data is not None:
        log(f"eval data: {loaded.eval_data.source} ({loaded.eval_data.shape}): {len(eval_pairs)} pairs, "
            f"{len(loaded.eval_data.skipped)} rows skipped; held out instead of eval_fraction, trains on all of data")
        if warning := describe_shared(shared_pairs(train_pairs, eval_pairs)):
            log(warning)
    return loaded


def tokenise(cfg: OrpoConfig, tokenizer, train_pairs: list, eval_pairs: list) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
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
    return train_tok, eval_tok


def finish(
    trainer: Trainer, evaluator: RunEvaluator, metrics_log: MetricsLogger, tokenizer, info, data: PreferenceData,
    before: dict[str, float] | None, last: dict[str, float],
    test: tuple[list[TokenizedPair], int] = ([], 0),
) -> dict[str, Any]:
    """The end of a run: last checkpoint, final evaluation and selection, the adapter, the summary, exports, plots."""
    cfg, state, dist, run_dir = trainer.cfg, trainer.state, trainer.dist, trainer.run_dir
    of_rank = {"run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens, "rank": dist.rank}
    trainer.save()
    after, evaluation = evaluator.finish(state.step)
    tested = evaluator.test(state.step, test[0], test[1], evaluation and evaluation["selected_step"], str(data.source))
    adapter_dir = save_final_adapter(trainer.model, tokenizer, cfg, run_dir, data, after, evaluation, trainer.sharded)
    if not dist.is_main:
        return of_rank
    summary = {
        "run_dir": str(run_dir), "steps": state.step, "tokens": state.tokens, "adapter": str(adapter_dir),
        "trainable_params": info.trainable_params, "total_params": info.total_params,
        # What gradient_checkpointing 'auto' resolved to (config.yaml records the setting asked for).
        "gradient_checkpointing": info.checkpointing.enabled if info.checkpointing else None,
        "final_train": last, "eval_before": before, "eval_after": after,
        "test": {"pairs": tested["pairs"]["evaluated"], "base": tested["base"]["reward_accuracy"],
                 "adapter": tested["adapter"]["reward_accuracy"], "change": tested["change"]["reward_accuracy"]}
        if tested else None,
    }
    metrics_log.log({"step": state.step, "split": "summary", **{k: v for k, v in summary.items() if k != "final_train"}})
    describe = f"done: {state.step} steps, {state.tokens} tokens, adapter in {adapter_dir}"
    if before and after:
        describe += (f"; held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
                     f"margin {before['reward_margin']:+.4f} -> {after['reward_margin']:+.4f}")
    log(describe)
    if trainer.chooser is not None:
        log(trainer.chooser.describe())
    metrics_log.close()
    export(cfg, adapter_dir, run_dir)
    _write_plots(run_dir)
    return summary


def export(cfg: OrpoConfig, adapter_dir: Path, run_dir: Path) -> None:
    """``--export``: the merged model, a GGUF file, or the adapter as a llama.cpp LoRA GGUF beside the adapter."""
    if cfg.export == "merged":
        from ..export.merged import export_merged

        export_merged(adapter_dir, run_dir / "merged")
    elif cfg.export == "gguf":
        from ..export.gguf import export_gguf

        export_gguf(adapter_dir, run_dir / "gguf" / f"{run_dir.name}-{cfg.gguf_quant}.gguf", cfg.gguf_quant)
    elif cfg.export == "gguf-lora":
        from ..export.gguf_lora import export_gguf_lora

        export_gguf_lora(adapter_dir, run_dir / "gguf-lora", base_quant=cfg.gguf_quant)


def save_final_adapter(
    model, tokenizer, cfg: OrpoConfig, run_dir: Path, data, metrics: dict | None, evaluation: dict | None = None,
    sharded: ShardedModel | None = None,
) -> Path | None:
    """The final adapter in peft format, with a card carrying the base's fingerprint and the evaluation.

    ``sharded``: every rank calls this to gather the weights; rank 0 writes (the others get None).
    """
    from ..export.adapters import save_adapter

    def write(state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        return save_adapter(model, tokenizer, cfg, run_dir / "adapter", data=data, metrics=metrics,
                            evaluation=evaluation, state_dict=state_dict)

    return write() if sharded is None else sharded.write_whole(write)


def _write_plots(run_dir: Path) -> None:
    try:
        from ..evaluation.plots import plot_run
    except ImportError:
        return
    plot_run(run_dir)
