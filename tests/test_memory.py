"""Unit tests of qlora_orpo.memory (fast; no model)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_orpo import memory
from qlora_orpo.memory import (
    apply_cpu_allocator_policy,
    format_memory,
    malloc_trim,
    peak_memory,
    reset_peak_memory,
)

LINUX = sys.platform.startswith("linux")


def test_cpu_keys_and_values():
    values = peak_memory("cpu")
    assert "peak_rss_mib" in values
    if LINUX:
        assert set(values) == {"peak_rss_mib", "rss_mib"}
        assert 0 < values["rss_mib"] <= values["peak_rss_mib"]
    assert all(isinstance(v, float) for v in values.values())


def test_accepts_torch_device():
    assert peak_memory(torch.device("cpu")).keys() == peak_memory("cpu").keys()


def test_reset_then_allocate_raises_the_peak_by_the_allocation():
    # Release free heap pages first: otherwise, after other tests, the tensor can land in
    # already-resident freed memory and raise no peak at all.
    malloc_trim()
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform cannot reset the CPU peak (no writable /proc/self/clear_refs)")
    before = peak_memory("cpu")
    tensor = torch.ones(50 * 2**20, dtype=torch.float32)  # 200 MiB, every page touched
    after = peak_memory("cpu")
    del tensor
    malloc_trim()
    rise = after["peak_rss_mib"] - before["peak_rss_mib"]
    assert 190 <= rise <= 260, f"peak rose by {rise:.0f} MiB for a 200 MiB tensor"
    # After freeing, the current RSS drops but the peak remembers the tensor.
    later = peak_memory("cpu")
    assert later["peak_rss_mib"] >= after["peak_rss_mib"] - 1
    assert later["rss_mib"] < later["peak_rss_mib"] - 150


def test_reset_forgets_an_earlier_peak():
    malloc_trim()
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform cannot reset the CPU peak")
    base = peak_memory("cpu")["peak_rss_mib"]
    tensor = torch.ones(25 * 2**20)  # 100 MiB
    del tensor
    malloc_trim()  # so that the freed tensor leaves the RSS (it may sit in the heap)
    high = peak_memory("cpu")["peak_rss_mib"]
    assert high > base + 90
    assert reset_peak_memory("cpu")
    low = peak_memory("cpu")["peak_rss_mib"]
    assert low < high - 80


def test_format_memory():
    assert format_memory({"peak_rss_mib": 1030.4, "rss_mib": 812.2}) == "rss 812 MiB (peak 1,030)"
    assert format_memory({"peak_rss_mib": 1030.4}) == "peak rss 1,030 MiB"
    text = format_memory({"peak_allocated_mib": 2048.0, "peak_reserved_mib": 3000.0})
    assert text == "gpu 2,048 MiB (res 3,000)"
    assert len(format_memory(peak_memory("cpu"))) < 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keys():
    assert reset_peak_memory("cuda")
    values = peak_memory("cuda")
    assert set(values) == {"peak_allocated_mib", "peak_reserved_mib"}


def test_glibc_policy_changes_nothing():
    text = apply_cpu_allocator_policy("glibc")
    assert isinstance(text, str) and text


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="cpu_allocator"):
        apply_cpu_allocator_policy("tcmalloc")


def test_auto_defers_to_a_preloaded_jemalloc(monkeypatch):
    monkeypatch.setattr(memory, "_preloaded_allocator", lambda: "jemalloc")
    monkeypatch.setattr(memory, "_glibc", lambda: pytest.fail("glibc must not be tuned under jemalloc"))
    if LINUX:
        assert apply_cpu_allocator_policy("auto") == "jemalloc (preloaded)"


# Frees 200 MiB of 64 KiB malloc blocks, each pinned in place by a small live block after it,
# and prints how much of it went back to the OS. mallopt changes the whole process for good,
# so this runs in a fresh interpreter rather than in the test runner.
_FRAGMENT_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from qlora_orpo.memory import apply_cpu_allocator_policy, peak_memory
    print(apply_cpu_allocator_policy(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    base = peak_memory("cpu")["rss_mib"]
    blocks, pins = [], []
    for _ in range(3200):
        block = libc.malloc(1 << 16)
        ctypes.memset(block, 1, 1 << 16)
        blocks.append(block)
        pins.append(libc.malloc(64))  # keeps the freed block from merging into the heap top
    high = peak_memory("cpu")["rss_mib"]
    for block in blocks:
        libc.free(block)
    print(round(high - base), round(high - peak_memory("cpu")["rss_mib"]))
    """
)


def _run_policy(policy: str) -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENT_SCRIPT, policy], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    description, numbers = out.stdout.strip().splitlines()[-2:]
    grown, returned = (int(n) for n in numbers.split())
    return description, grown, returned


@pytest.mark.skipif(not LINUX, reason="the allocator policy applies to Linux only")
def test_trim_policy_returns_freed_memory_that_glibc_keeps():
    description, grown, returned = _run_policy("trim")
    if "not glibc" in description:
        pytest.skip("not a glibc system")
    assert description.startswith("glibc malloc: mmap threshold 64 KiB, trim threshold 128 KiB, 2 arenas")
    assert grown >= 190 and returned >= 190, (grown, returned)
    description, grown, returned = _run_policy("glibc")
    assert description == "glibc malloc, default settings"
    # With the defaults the pinned holes stay in the heap (a control: the test can tell).
    assert grown >= 190 and returned < 100, (grown, returned)
    description, _, returned = _run_policy("auto")
    assert returned >= 190 or "preloaded" in description


def test_malloc_trim_returns_bool():
    assert isinstance(malloc_trim(), bool)


def _run_reexec(policy: str) -> str:
    child = "from qlora_orpo.memory import _preloaded_allocator; print(_preloaded_allocator())"
    code = (
        "from qlora_orpo.memory import reexec_with_jemalloc\n"
        f"reexec_with_jemalloc({policy!r}, ['-c', {child!r}])\n"
        "print('not re-executed')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "QLORA_ORPO_JEMALLOC_REEXEC")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_auto_policy_reexecutes_under_jemalloc_exactly_when_the_library_exists():
    from qlora_orpo.memory import find_jemalloc

    expected = "jemalloc" if find_jemalloc() else "not re-executed"
    assert _run_reexec("auto") == expected


def test_glibc_policy_never_reexecutes():
    assert _run_reexec("glibc") == "not re-executed"
