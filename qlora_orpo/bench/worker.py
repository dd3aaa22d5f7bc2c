"""The worker (one configuration measured in a fresh process) and the parent's subprocess runner.

Every configuration runs in a fresh process (the script again with ``--worker SPEC``) so
that no allocator cache, peak or thread pool carries over. A worker:

1. applies the CPU allocator policy (jemalloc or mimalloc come from ``LD_PRELOAD``, set by the parent);
2. loads the base and a fresh LoRA adapter with ``model.load_model_for_training`` (4-bit NF4,
   r=16, alpha 32, every linear layer, dropout 0 so that every configuration computes the
   same function), builds :func:`~.spec.fixed_pair` at ``max_length`` and an AdamW optimizer,
   and for TRL constructs its ``ORPOTrainer`` around that same model;
3. runs ``gc.collect()``, ``malloc_trim()`` and ``reset_peak_memory()`` and reads the
   baseline (CUDA: allocated bytes; CPU: the resident set);
4. runs the step(s): forward, backward and ``optimizer.step()``;
5. times a float32 matmul (after the peak is read, so it cannot raise it) for the roofline;
6. prints one JSON line: peak memory above the baseline, seconds per pair, tokens per
   second, the loss of the first step, the analytic floor (:mod:`.floor`) and roofline (:mod:`.flops`).

Ours runs with ``nll_over_prompt=True`` to compute the same loss as TRL (NLL over prompt + response).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.collate import collate_pairs
from ..models.dtype_probe import matmul_rate
from ..models.floor import ModelShape, memory_floor
from ..models.memory import (
    MIB,
    MIMALLOC_ENV,
    apply_cpu_allocator_policy,
    find_jemalloc,
    find_mimalloc,
    malloc_trim,
    peak_memory,
    reset_peak_memory,
)
from .flops import roofline_seconds, step_flops
from .spec import PEER, BenchSpec, fixed_pair
from .trl_adapter import TRL_MISSING, peer_missing_reason, trl_loss, trl_trainer

LIBRARY_MISSING = {
    "jemalloc": "libjemalloc.so.2 not found (install libjemalloc2 or set JEMALLOC_PATH)",
    "mimalloc": "libmimalloc.so not found (pip install cmeel-mimalloc or set MIMALLOC_PATH)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_now_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    memory = peak_memory(device)
    return memory.get("rss_mib", memory["peak_rss_mib"])


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return peak_memory(device)["peak_rss_mib"]


def _head(spec: BenchSpec) -> dict[str, Any]:
    return {"method": spec.method, "max_length": spec.max_length, "allocator": spec.allocator}


def run_worker(spec: BenchSpec) -> dict[str, Any]:
    """Load, measure one configuration in this process, and return its result row."""
    row = _head(spec)
    if spec.method == PEER and peer_missing_reason():  # checked before the model is loaded
        return {**row, "skipped": TRL_MISSING}
    from ..models.loader import load_model_for_training
    from ..training.step import OrpoStep

    cfg = spec.config()
    row["allocator_detail"] = apply_cpu_allocator_policy(cfg.cpu_allocator)
    wanted = spec.preloaded_allocator
    if wanted and wanted not in row["allocator_detail"]:
        return {**row, "error": f"LD_PRELOAD did not bring {wanted} into the worker ({row['allocator_detail']})"}
    model, tokenizer, info = load_model_for_training(cfg)
    device = info.device
    pair = fixed_pair(tokenizer, spec.max_length, spec.data)
    batch = collate_pairs([pair], tokenizer.pad_token_id).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()  # gradient checkpointing is only active in training mode

    with tempfile.TemporaryDirectory() as scratch:
        if spec.method == PEER:
            trainer = trl_trainer(model, tokenizer, spec.beta, spec.max_length, scratch)

            def forward_backward() -> tuple[torch.Tensor, dict[str, Any]]:
                loss, metrics = trl_loss(trainer, model, batch)
                loss.backward()
                return loss.detach(), metrics
        else:
            step = OrpoStep(model, spec.beta, spec.method, spec.chunk_size, True, tokenizer.pad_token_id, device)

            def forward_backward() -> tuple[torch.Tensor, dict[str, Any]]:
                out = step(batch)
                return out.loss, out.metrics

        gc.collect()
        malloc_trim()
        _sync(device)
        reset_ok = reset_peak_memory(device)
        baseline = _memory_now_mib(device)
        seconds, losses, first_metrics = [], [], None
        for _ in range(spec.steps):
            _sync(device)
            start = time.perf_counter()
            loss, metrics = forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            first_metrics = first_metrics or {k: float(v) for k, v in metrics.items()}
        peak = _peak_mib(device)

    shape = ModelShape.from_config(model.get_base_model().config)
    activation_bytes = model.get_input_embeddings().weight.element_size()
    floor = memory_floor(shape, spec.max_length, 16, "all-linear", spec.chunk_size, activation_bytes)
    two_sides = memory_floor(shape, spec.max_length, 16, "all-linear", spec.chunk_size, activation_bytes, sequences=2)
    timed = seconds[1:] or seconds  # with several steps, the first (warm-up) is left out
    per_step = sum(timed) / len(timed)
    tokens = batch.chosen.num_tokens + batch.rejected.num_tokens
    flops = step_flops(shape, spec.max_length, 16, "all-linear", spec.method).total * batch.size
    # The roofline at the rate of the step's own compute dtype (bfloat16 runs 4x float32 on
    # some CPUs; a float32 rate would put a bfloat16 step "above" its roofline).
    rate = matmul_rate(info.compute_dtype) if device.type == "cpu" else float("nan")
    roofline = roofline_seconds(flops, rate) / batch.size if device.type == "cpu" else float("nan")
    row.update(
        device=str(device), threads=torch.get_num_threads(), quant=info.quant,
        compute_dtype=str(info.compute_dtype).removeprefix("torch."), pairs=batch.size, tokens=tokens,
        baseline_mib=baseline, peak_mib=peak, peak_above_baseline_mib=peak - baseline,
        peak_reset=reset_ok, seconds_per_step=seconds, seconds_per_pair=per_step / batch.size,
        tokens_per_s=tokens / per_step, loss=losses[0], losses=losses,
        nll=first_metrics["nll"], or_loss=first_metrics["or_loss"],
        floor_step_mib=floor.step_bytes / MIB, floor_resident_mib=floor.resident_bytes / MIB,
        floor_two_sequences_mib=two_sides.step_bytes / MIB, floor_steady_step_mib=floor.steady_step_bytes / MIB,
        floor_ratio=(peak - baseline) / (floor.step_bytes / MIB),
        step_gflop=flops / 1e9, matmul_gflops=rate / 1e9, roofline_s=roofline,
        roofline_ratio=(per_step / batch.size) / roofline,
        trainable_params=info.trainable_params, data_row=pair.row,
    )
    return row


def worker_main(spec_json: str) -> int:
    """``--worker``: run one configuration; everything but the result line goes to stderr."""
    spec = BenchSpec(**json.loads(spec_json))
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        row = run_worker(spec)
    stdout.write(json.dumps(row) + "\n")
    stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------


def _parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "method" in value:
                return value
    return None


def worker_env(spec: BenchSpec, base: dict[str, str]) -> dict[str, str] | str:
    """The worker's environment (``LD_PRELOAD`` and mimalloc options as its allocator needs), or why it cannot run."""
    env = dict(base)
    wanted = spec.preloaded_allocator
    if wanted is None:
        return env
    library = find_mimalloc() if wanted == "mimalloc" else find_jemalloc()
    if library is None:
        return LIBRARY_MISSING[wanted]
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    if spec.allocator == "mimalloc":
        for key, value in MIMALLOC_ENV.items():
            env.setdefault(key, value)  # as the training re-exec sets them; a value set by the caller wins
    elif spec.allocator == "mimalloc-default":
        # The library's own defaults: none of the caller's or the project's mimalloc options.
        env = {k: v for k, v in env.items() if not k.startswith("MIMALLOC_") or k == "MIMALLOC_PATH"}
    return env


def run_in_subprocess(script: Path | None, spec: BenchSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run ``script --worker SPEC`` (no script: ``python -m qlora_orpo bench --worker SPEC``) in a fresh
    process and return its row (or an ``error`` row)."""
    row = _head(spec)
    env = worker_env(spec, dict(os.environ))
    if isinstance(env, str):
        return {**row, "skipped": env}
    entry = [str(script)] if script is not None else ["-m", "qlora_orpo", "bench"]
    command = [sys.executable, *entry, "--worker", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    result = _parse_result(done.stdout)
    if done.returncode != 0 or result is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return {**row, "error": f"worker exited with {done.returncode}: {tail}"}
    return result


def run_benchmark(
    script: Path | None,
    specs: Sequence[BenchSpec],
    on_row: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run every spec in its own process; the peer's rows are skipped, with the reason, when trl is missing."""
    rows: list[dict[str, Any]] = []
    peer_missing = peer_missing_reason() if any(s.method == PEER for s in specs) else None
    for spec in specs:
        if spec.method == PEER and peer_missing:
            row = {**_head(spec), "skipped": peer_missing}
        else:
            row = run_in_subprocess(script, spec, timeout)
            if spec.method == PEER and "skipped" in row:
                peer_missing = row["skipped"]
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
