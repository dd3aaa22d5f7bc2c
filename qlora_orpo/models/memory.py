"""Peak-memory measurement (CUDA and CPU) and the CPU allocator policy.

On CUDA the numbers come from torch's caching allocator. On the CPU they come from the
kernel: the resident set size now and its high-water mark. Linux lets a process reset
its high-water mark (``VmHWM``) by writing ``5`` to ``/proc/self/clear_refs``, so a
benchmark can measure the peak of a training step above the post-load baseline;
``ru_maxrss`` cannot be reset and is only the fallback.

glibc malloc keeps freed memory in its arenas, so the resident size of a long training
run on the CPU drifts up and never comes down. The CPU allocator policy was chosen by
measurement (``scripts/bench_orpo.py --allocators glibc,trim,jemalloc,mimalloc``, docs/benchmarks.md):
one split step of the embedded model at 1024 tokens peaked 1,492 MiB above its baseline
under glibc's defaults at 8.98 s, 226 MiB with glibc trimming (64 KiB mmap threshold) at
18.3 s, and 263 MiB under jemalloc at 9.79 s; mimalloc ran at jemalloc's speed for 60-80 MiB
more. jemalloc is rarely installed, but mimalloc comes from PyPI (``cmeel-mimalloc``, a Linux
dependency of this package), so the default ("auto") re-executes ``finetune.py`` with
``LD_PRELOAD`` of mimalloc from that package, else of the system's jemalloc, else trims glibc:
see :func:`choose_allocator` and :func:`reexec_with_allocator`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ConfigError

MIB = 2**20
_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

TRIM_THRESHOLD_BYTES = 128 * 1024  # give the top of the heap back once 128 KiB are free
MMAP_THRESHOLD_BYTES = 64 * 1024  # blocks from 64 KiB up get their own mapping, unmapped on free
ARENA_MAX = 2  # fewer per-thread arenas, less memory stranded in them

ALLOCATOR_POLICIES = ("auto", "glibc", "trim", "jemalloc", "mimalloc")
PRELOADABLE = ("mimalloc", "jemalloc")  # "auto" tries them in this order
PRELOADED_NAMES = ("mimalloc", "jemalloc", "tcmalloc")
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)
MIMALLOC_DISTRIBUTION = "cmeel-mimalloc"  # a manylinux wheel with libmimalloc.so (a Linux dependency)
MIMALLOC_LIBRARY = "libmimalloc.so"
# mimalloc options for the re-executed process (only where the user has not set them). Empty
# by measurement: with MIMALLOC_PURGE_DELAY=0 and MIMALLOC_ARENA_EAGER_COMMIT=0 (mimalloc 3.4.3),
# split at 512 tokens peaked 179 MiB above baseline against 214 with the defaults (trimmed
# glibc: 177), but its steps took 17-23 s against 10-13 s (trimmed glibc: 17 s): freeing at
# once costs what trimming glibc costs. Speed is why mimalloc is preloaded, so no options.
MIMALLOC_ENV: dict[str, str] = {}
_SOURCES = {"mimalloc": "the cmeel-mimalloc package", "jemalloc": "the system's libjemalloc.so.2"}
# Set in the environment of the re-executed process, so it never re-executes again; its value
# is the one-line reason for the choice, for the training log.
_REEXEC_MARK = "QLORA_ORPO_ALLOCATOR_REEXEC"


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def peak_memory(device: torch.device | str) -> dict[str, float]:
    """Memory numbers in MiB for ``device``.

    CUDA: ``peak_allocated_mib`` (tensors) and ``peak_reserved_mib`` (allocator cache)
    since the last reset. CPU: ``peak_rss_mib``, the resident-set high-water mark since
    the last :func:`reset_peak_memory` (since process start where it cannot be reset),
    and ``rss_mib``, the resident set now (Linux only).
    """
    device = _device(device)
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB,
        }
    hwm = _status_kib("VmHWM")
    peak = hwm / 1024 if hwm is not None else _ru_maxrss_mib()
    rss = _current_rss_mib()
    if rss is None:
        return {"peak_rss_mib": peak}
    # VmHWM and statm are sampled separately; keep peak >= current for the reader.
    return {"peak_rss_mib": max(peak, rss), "rss_mib": rss}


def reset_peak_memory(device: torch.device | str) -> bool:
    """Start a new peak measurement; False where the platform cannot reset the CPU peak."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        # "5" resets the peak RSS (VmHWM) to the current RSS; see proc(5).
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def format_memory(values: dict[str, float]) -> str:
    """A short string for a progress bar: ``"gpu 812 MiB (res 1,024)"`` or ``"rss 812 MiB (peak 1,030)"``."""
    if "peak_allocated_mib" in values:
        return (
            f"gpu {values['peak_allocated_mib']:,.0f} MiB (res {values.get('peak_reserved_mib', 0.0):,.0f})"
        )
    peak = values.get("peak_rss_mib")
    rss = values.get("rss_mib")
    if rss is None:
        return f"peak rss {peak:,.0f} MiB" if peak is not None else "mem n/a"
    return f"rss {rss:,.0f} MiB (peak {peak:,.0f})" if peak is not None else f"rss {rss:,.0f} MiB"


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _current_rss_mib() -> float | None:
    try:
        pages = int(_STATM.read_text().split()[1])  # size resident shared text lib data dt
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _ru_maxrss_mib() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Allocator policy
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on other C libraries (musl) and platforms."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _preloaded_allocator() -> str | None:
    """Name "mimalloc", "jemalloc" or "tcmalloc" when one is mapped into this process (LD_PRELOAD), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in PRELOADED_NAMES:
        if f"lib{name}" in maps:
            return name
    return None


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2 (``$JEMALLOC_PATH`` first), or None."""
    import ctypes.util

    explicit = os.environ.get("JEMALLOC_PATH")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for candidate in JEMALLOC_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    found = ctypes.util.find_library("jemalloc")
    return found if found and Path(found).is_file() else None


def find_mimalloc(distribution: str = MIMALLOC_DISTRIBUTION) -> str | None:
    """Path of ``libmimalloc.so`` from the installed ``cmeel-mimalloc`` wheel (``$MIMALLOC_PATH`` first), or None.

    The wheel lists its files in its metadata (``cmeel.prefix/lib/libmimalloc.so`` relative to
    site-packages), so the library is found wherever the environment lives; if the metadata
    has no file list, ``cmeel.prefix/lib`` beside the distribution is tried.
    """
    explicit = os.environ.get("MIMALLOC_PATH")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [dist.locate_file(f) for f in dist.files or () if f.name == MIMALLOC_LIBRARY]
    candidates.append(dist.locate_file(f"cmeel.prefix/lib/{MIMALLOC_LIBRARY}"))
    for candidate in candidates:
        if Path(str(candidate)).is_file():
            return str(candidate)
    return None


@dataclass(frozen=True)
class AllocatorChoice:
    """What the CPU allocator policy decided before any model code runs.

    ``preload`` is the library to ``LD_PRELOAD`` by re-executing the process (None: stay
    as is); ``name`` is the allocator that will serve malloc; ``reason`` is one line for the log.
    """

    name: str
    preload: str | None
    reason: str
    env: tuple[tuple[str, str], ...] = ()


def choose_allocator(
    policy: str,
    libraries: Mapping[str, str | None],
    preloaded: str | None = None,
    reexecuted: bool = False,
    linux: bool = True,
) -> AllocatorChoice:
    """The pure decision behind :func:`reexec_with_allocator` (no file system, no process state).

    ``libraries`` maps "mimalloc" and "jemalloc" to a found library path or None; ``preloaded``
    is the allocator already mapped into this process; ``reexecuted`` says the process was
    already re-executed once (the environment mark), so it must not loop. Order for "auto":
    mimalloc from the cmeel-mimalloc package, then the system's jemalloc, then glibc trimming.
    """
    if policy not in ALLOCATOR_POLICIES:
        raise ValueError(f"cpu_allocator: {policy!r} is not one of {', '.join(ALLOCATOR_POLICIES)}")
    if not linux:
        return AllocatorChoice("system", None, f"policy {policy!r} applies to Linux only")
    if policy in ("glibc", "trim"):
        return AllocatorChoice("glibc", None, f"policy {policy!r} asks for glibc malloc")
    if preloaded is not None:
        return AllocatorChoice(preloaded, None, f"{preloaded} is already preloaded")
    if reexecuted:
        return AllocatorChoice("glibc", None, "re-executed once already and no allocator got preloaded")
    wanted = PRELOADABLE if policy == "auto" else (policy,)
    for name in wanted:
        library = libraries.get(name)
        if library:
            env = tuple(MIMALLOC_ENV.items()) if name == "mimalloc" else ()
            return AllocatorChoice(name, library, f"{name} from {library} ({_SOURCES[name]})", env)
    if policy == "auto":
        return AllocatorChoice(
            "glibc", None, "neither the cmeel-mimalloc package nor libjemalloc.so.2 found: glibc with trimming, "
            "CPU steps about 1.6x slower (pip install cmeel-mimalloc)",
        )
    return AllocatorChoice("glibc", None, f"{policy} was asked for but {_SOURCES[policy]} is not found")


def allocator_choice(policy: str) -> AllocatorChoice:
    """:func:`choose_allocator` on this process's facts: the libraries found, what is preloaded, the mark."""
    libraries = {} if policy in ("glibc", "trim") else {"mimalloc": find_mimalloc(), "jemalloc": find_jemalloc()}
    return choose_allocator(
        policy, libraries, preloaded=_preloaded_allocator(), reexecuted=bool(os.environ.get(_REEXEC_MARK)),
        linux=sys.platform.startswith("linux"),
    )


def reexec_with_allocator(policy: str, argv: list[str]) -> None:
    """Replace this process with ``python argv...`` under the allocator the policy chooses, if any.

    mimalloc and jemalloc must be loaded before the first ``malloc``, which only ``LD_PRELOAD``
    at process start can do. When :func:`allocator_choice` names a library to preload this
    calls ``os.execve`` and does not return; the new process carries the reason in an
    environment mark, so it never re-executes again and its log can say why. Otherwise it
    returns doing nothing ("auto" then trims glibc in :func:`apply_cpu_allocator_policy`).
    Call it first thing in a command-line entry point, never from library code or tests.
    """
    choice = allocator_choice(policy)
    if choice.preload is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [choice.preload, env.get("LD_PRELOAD", "")]))
    for key, value in choice.env:
        env.setdefault(key, value)  # a value the user set wins
    env[_REEXEC_MARK] = choice.reason
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def apply_cpu_allocator_policy(policy: str) -> str:
    """Apply ``policy`` (one of :data:`ALLOCATOR_POLICIES`) to this process and describe what was done.

    "trim" tunes glibc malloc so that freed memory returns to the OS promptly; "auto"
    leaves a preloaded mimalloc/jemalloc/tcmalloc alone and otherwise trims; "glibc" changes
    nothing; "mimalloc" and "jemalloc" require that allocator to be preloaded already
    (:func:`reexec_with_allocator`). Calling it again with the same policy is harmless.
    """
    if policy not in ALLOCATOR_POLICIES:
        raise ValueError(f"cpu_allocator: {policy!r} is not one of {', '.join(ALLOCATOR_POLICIES)}")
    if not sys.platform.startswith("linux"):
        return f"system allocator (policy {policy!r} applies to Linux only)"
    preloaded = _preloaded_allocator()
    why = os.environ.get(_REEXEC_MARK)
    described = f"{preloaded} (preloaded{': ' + why if why and preloaded else ''})"
    if policy == "glibc":
        return "glibc malloc, default settings" if preloaded is None else described
    if policy in PRELOADABLE:
        if preloaded != policy:
            install = "pip install cmeel-mimalloc" if policy == "mimalloc" else "apt-get install libjemalloc2"
            raise ConfigError(
                f"cpu_allocator: {policy} was asked for but is not loaded ({install}, and run through "
                "scripts/finetune.py, which preloads it)"
            )
        return described
    if policy == "auto" and preloaded is not None:
        return described
    libc = _glibc()
    if libc is None:
        return "system allocator unchanged (not glibc)"
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "mmap threshold 64 KiB"),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "trim threshold 128 KiB"),
        (M_ARENA_MAX, ARENA_MAX, f"{ARENA_MAX} arenas"),
    )
    applied, failed = [], []
    for param, value, label in settings:
        (applied if libc.mallopt(param, value) == 1 else failed).append(label)  # mallopt returns 1 on success
    text = "glibc malloc: " + ", ".join(applied) if applied else "glibc malloc unchanged"
    if failed:
        text += f" (rejected: {', '.join(failed)})"
    if preloaded is not None:
        text += f"; note {preloaded} is preloaded and serves malloc"
    elif policy == "auto":
        if not why:
            choice = allocator_choice("auto")
            why = f"{choice.name} found but not preloaded: scripts/finetune.py preloads it" if choice.preload else choice.reason
        text += f" ({why})"
    return text


def malloc_trim() -> bool:
    """Ask glibc to return free heap memory to the OS; True if it released any."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


def available_memory_bytes(device: torch.device) -> int:
    """What the device has free now: CUDA's free memory, or the CPU's ``MemAvailable`` (0: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
