"""Unit tests of qlora_orpo.models.memory (fast; no model)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_orpo.models import memory
from qlora_orpo.models.memory import (
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
    monkeypatch.delenv(memory._REEXEC_MARK, raising=False)
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
    from qlora_orpo.models.memory import apply_cpu_allocator_policy, peak_memory
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


def _run_reexec(policy: str, extra_env: dict[str, str] | None = None) -> list[str]:
    child = (
        "import os; from qlora_orpo.models.memory import _preloaded_allocator, apply_cpu_allocator_policy; "
        f"print(_preloaded_allocator()); print(apply_cpu_allocator_policy({policy!r}))"
    )
    code = (
        "from qlora_orpo.models.memory import reexec_with_allocator\n"
        f"reexec_with_allocator({policy!r}, ['-c', {child!r}])\n"
        "print('not re-executed')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory._REEXEC_MARK)}
    env.update(extra_env or {})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


@pytest.mark.skipif(not LINUX, reason="the allocator policy applies to Linux only")
def test_auto_policy_reexecutes_under_the_allocator_the_decision_names():
    choice = memory.allocator_choice("auto")
    lines = _run_reexec("auto")
    if choice.preload is None:
        assert lines == ["not re-executed"]
    else:
        # The child runs under the chosen allocator and its log line says which and why.
        assert lines[0] == choice.name, lines
        assert lines[1] == f"{choice.name} (preloaded: {choice.reason})"


def test_glibc_policy_never_reexecutes():
    assert _run_reexec("glibc") == ["not re-executed"]


@pytest.mark.skipif(not LINUX, reason="the allocator policy applies to Linux only")
def test_the_environment_mark_stops_a_second_reexecution():
    assert _run_reexec("auto", {memory._REEXEC_MARK: "already done"}) == ["not re-executed"]


# ---------------------------------------------------------------------------------------------
# The allocator decision, without re-executing anything
# ---------------------------------------------------------------------------------------------

MIMALLOC = "/site/cmeel.prefix/lib/libmimalloc.so"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@pytest.mark.parametrize(
    ("libraries", "name", "preload"),
    [
        ({"mimalloc": MIMALLOC, "jemalloc": JEMALLOC}, "mimalloc", MIMALLOC),
        ({"mimalloc": None, "jemalloc": JEMALLOC}, "jemalloc", JEMALLOC),
        ({"mimalloc": MIMALLOC, "jemalloc": None}, "mimalloc", MIMALLOC),
        ({"mimalloc": None, "jemalloc": None}, "glibc", None),
    ],
)
def test_auto_prefers_mimalloc_then_jemalloc_then_glibc(libraries, name, preload):
    choice = memory.choose_allocator("auto", libraries)
    assert (choice.name, choice.preload) == (name, preload)
    assert "\n" not in choice.reason and (preload is None or preload in choice.reason)
    assert dict(choice.env) == (memory.MIMALLOC_ENV if name == "mimalloc" else {})
    if preload is None:
        assert "cmeel-mimalloc" in choice.reason and "jemalloc" in choice.reason


def test_explicit_policies_take_only_their_own_library():
    both = {"mimalloc": MIMALLOC, "jemalloc": JEMALLOC}
    assert memory.choose_allocator("jemalloc", both).preload == JEMALLOC
    assert memory.choose_allocator("mimalloc", both).preload == MIMALLOC
    missing = memory.choose_allocator("mimalloc", {"mimalloc": None, "jemalloc": JEMALLOC})
    assert missing.preload is None and "cmeel-mimalloc" in missing.reason
    for policy in ("glibc", "trim"):
        assert memory.choose_allocator(policy, both).preload is None
    with pytest.raises(ValueError, match="cpu_allocator"):
        memory.choose_allocator("tcmalloc", both)


def test_no_reexec_when_preloaded_already_marked_or_not_linux():
    both = {"mimalloc": MIMALLOC, "jemalloc": JEMALLOC}
    preloaded = memory.choose_allocator("auto", both, preloaded="jemalloc")
    assert (preloaded.name, preloaded.preload) == ("jemalloc", None)
    marked = memory.choose_allocator("auto", both, reexecuted=True)
    assert marked.preload is None and "re-executed" in marked.reason
    assert memory.choose_allocator("mimalloc", both, linux=False).preload is None


class _FakeDistribution:
    """What importlib.metadata.distribution returns, over a directory standing in for site-packages."""

    def __init__(self, root, files):
        self.root, self.files = root, files

    def locate_file(self, name):
        return self.root / str(name)


def test_find_mimalloc_locates_the_library_through_the_package_metadata(monkeypatch, tmp_path):
    from importlib.metadata import PackagePath

    monkeypatch.delenv("MIMALLOC_PATH", raising=False)
    lib = tmp_path / "site-packages" / "cmeel.prefix" / "lib"
    lib.mkdir(parents=True)
    (lib / "libmimalloc.so").write_bytes(b"\x7fELF")
    files = [PackagePath("cmeel.prefix/lib/libmimalloc.so.3"), PackagePath("cmeel.prefix/lib/libmimalloc.so")]
    fake = _FakeDistribution(tmp_path / "site-packages", files)
    monkeypatch.setattr(memory.importlib.metadata, "distribution", lambda name: fake)
    assert memory.find_mimalloc() == str(lib / "libmimalloc.so")
    # No file list in the metadata: the cmeel.prefix path beside the distribution still works.
    fake.files = None
    assert memory.find_mimalloc() == str(lib / "libmimalloc.so")
    # Listed but missing on disk (a broken install): not found.
    (lib / "libmimalloc.so").unlink()
    assert memory.find_mimalloc() is None


def test_find_mimalloc_without_the_package_or_with_an_explicit_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MIMALLOC_PATH", raising=False)

    def missing(name):
        raise memory.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(memory.importlib.metadata, "distribution", missing)
    assert memory.find_mimalloc() is None
    explicit = tmp_path / "libmimalloc.so"
    monkeypatch.setenv("MIMALLOC_PATH", str(explicit))
    assert memory.find_mimalloc() is None  # named but absent
    explicit.write_bytes(b"\x7fELF")
    assert memory.find_mimalloc() == str(explicit)


def test_explicit_mimalloc_policy_requires_it_preloaded(monkeypatch):
    monkeypatch.setattr(memory, "_preloaded_allocator", lambda: None)
    if LINUX:
        with pytest.raises(memory.ConfigError, match="cmeel-mimalloc"):
            apply_cpu_allocator_policy("mimalloc")
    monkeypatch.setattr(memory, "_preloaded_allocator", lambda: "mimalloc")
    monkeypatch.setenv(memory._REEXEC_MARK, "mimalloc from /x/libmimalloc.so (the cmeel-mimalloc package)")
    if LINUX:
        assert apply_cpu_allocator_policy("mimalloc") == (
            "mimalloc (preloaded: mimalloc from /x/libmimalloc.so (the cmeel-mimalloc package))")
