"""The CPU compute dtype, chosen by timing a matmul rather than by reading CPU flags.

oneDNN reporting native bfloat16 support does not make bfloat16 faster: on this project's
machine (AMD EPYC, torch 2.13) a float32 matmul ran at about 322 GFLOP/s and a bfloat16 one
at 165, and the NF4 split step at 512 tokens took 6.8 s per pair in float32 against 9.5 s in
bfloat16, although ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` was true. So
:func:`fastest_cpu_dtype` times one matmul of the embedded model's MLP shape in both dtypes
and picks bfloat16 only when it is clearly faster (:data:`BF16_MARGIN`).

The probe takes well under a second, but its result is cached in
``<cache_root>/dtype_probe.json``, keyed by torch version, CPU model and thread count (what
the answer depends on), so later runs on the same machine do not re-probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

# (tokens, hidden, intermediate): one up/gate projection of SmolLM2-135M on 512 tokens.
PROBE_SHAPE = (512, 576, 1536)
PROBE_REPEATS = 5
# bfloat16 must be at least this much faster than float32: it also rounds, so a tie goes to float32.
BF16_MARGIN = 1.10
CACHE_FILE = "dtype_probe.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_flops(shape: tuple[int, int, int] = PROBE_SHAPE) -> int:
    """Floating-point operations of one ``(m, k) @ (k, n)`` matmul: a multiply and an add per term."""
    m, k, n = shape
    return 2 * m * k * n


def matmul_seconds(
    dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS
) -> float:
    """Best-of-``repeats`` seconds of one ``(m, k) @ (k, n)`` matmul in ``dtype`` on the CPU.

    The first call is left out (oneDNN builds its kernel for the shape then); best-of rather
    than the mean because other processes on the machine only ever add time.
    """
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(
    dtype: torch.dtype = torch.float32, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS
) -> float:
    """Measured FLOP/s of a ``shape`` matmul in ``dtype`` on this CPU (best of ``repeats``)."""
    return matmul_flops(shape) / matmul_seconds(dtype, shape, repeats)


def time_dtypes(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Best seconds of one probe matmul per dtype name; a dtype whose matmul fails is left out."""
    timings = {}
    for name, dtype in DTYPES.items():
        try:
            timings[name] = matmul_seconds(dtype, shape, repeats)
        except RuntimeError:  # a build without a CPU bfloat16 matmul: that dtype is simply not a candidate
            continue
    return timings


def choose_dtype(timings: dict[str, float], margin: float = BF16_MARGIN) -> str:
    """The dtype name to compute in: "bfloat16" only when its time times ``margin`` is still below float32's.

    ``timings`` maps dtype names to seconds of the same work; missing or non-positive
    entries count as unavailable, and float32 is the answer whenever the two cannot be compared.
    """
    fp32, bf16 = timings.get("float32"), timings.get("bfloat16")
    if not bf16 or bf16 <= 0:
        return "float32"
    if not fp32 or fp32 <= 0:
        return "bfloat16"
    return "bfloat16" if bf16 * margin < fp32 else "float32"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def probe_key(threads: int | None = None) -> str:
    """What the probe's answer depends on: torch version, CPU model and thread count."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"torch {torch.__version__} | {cpu_model()} | {threads} threads"


def default_cache_path() -> Path:
    from .embedded import cache_root

    return cache_root() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: probe again and rewrite it
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-probe next time
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        scratch.replace(path)  # atomic, so a concurrent run never reads half a file


def probe_timings(cache: Path | None = None, refresh: bool = False) -> dict[str, float]:
    """Seconds per probe matmul for each dtype on this machine, from the cache when it has this key."""
    path = cache or default_cache_path()
    key = probe_key()
    data = _read_cache(path)
    entry = data.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("timings"), dict):
        return {str(k): float(v) for k, v in entry["timings"].items()}
    timings = time_dtypes()
    data[key] = {"timings": timings, "shape": list(PROBE_SHAPE), "choice": choose_dtype(timings)}
    _write_cache(path, data)
    return timings


def fastest_cpu_dtype(cache: Path | None = None, refresh: bool = False) -> torch.dtype:
    """torch.float32 or torch.bfloat16, whichever runs the probe matmul faster here (float32 on a tie).

    ``cache``: the JSON file (default ``<cache_root>/dtype_probe.json``); ``refresh``: probe
    again even when the cache has an answer for this torch, CPU and thread count.
    """
    return DTYPES[choose_dtype(probe_timings(cache, refresh))]
