"""qlora_orpo.models.dtype_probe: the dtype decision on fake timings, the JSON cache round trip, a real probe."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_orpo.models import dtype_probe
from qlora_orpo.models.dtype_probe import (
    choose_dtype,
    fastest_cpu_dtype,
    matmul_flops,
    probe_key,
    probe_timings,
)


@pytest.mark.parametrize(
    ("timings", "expected"),
    [
        ({"float32": 2.0, "bfloat16": 1.0}, "bfloat16"),  # twice as fast
        ({"float32": 1.0, "bfloat16": 2.0}, "float32"),  # this machine: emulated bf16, half the rate
        ({"float32": 1.05, "bfloat16": 1.0}, "float32"),  # 5% is within the margin: not clearly faster
        ({"float32": 1.0, "bfloat16": 1.0}, "float32"),  # a tie goes to the exact dtype
        ({"float32": 1.0}, "float32"),  # no bf16 matmul in this build
        ({"float32": 1.0, "bfloat16": 0.0}, "float32"),  # a nonsense timing is not a win
        ({"bfloat16": 1.0}, "bfloat16"),
        ({}, "float32"),
    ],
)
def test_choose_dtype(timings, expected):
    assert choose_dtype(timings) == expected


def test_choose_dtype_margin_is_the_threshold():
    timings = {"float32": 1.2, "bfloat16": 1.0}  # bf16 20% faster
    assert choose_dtype(timings, margin=1.1) == "bfloat16"
    assert choose_dtype(timings, margin=1.25) == "float32"


class _FakeTiming:
    def __init__(self, timings):
        self.timings, self.calls = timings, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return dict(self.timings)


def test_cache_round_trip(monkeypatch, tmp_path):
    fake = _FakeTiming({"float32": 2.0, "bfloat16": 1.0})
    monkeypatch.setattr(dtype_probe, "time_dtypes", fake)
    cache = tmp_path / "sub" / "dtype_probe.json"
    assert fastest_cpu_dtype(cache) is torch.bfloat16 and fake.calls == 1
    stored = json.loads(cache.read_text())
    assert stored[probe_key()]["timings"] == {"float32": 2.0, "bfloat16": 1.0}
    assert stored[probe_key()]["choice"] == "bfloat16"
    # A later run reads the answer instead of probing, even if the machine would now say otherwise.
    fake.timings = {"float32": 1.0, "bfloat16": 2.0}
    assert fastest_cpu_dtype(cache) is torch.bfloat16 and fake.calls == 1
    assert fastest_cpu_dtype(cache, refresh=True) is torch.float32 and fake.calls == 2
    assert json.loads(cache.read_text())[probe_key()]["choice"] == "float32"


def test_cache_is_keyed_by_torch_cpu_and_threads(monkeypatch, tmp_path):
    fake = _FakeTiming({"float32": 1.0, "bfloat16": 2.0})
    monkeypatch.setattr(dtype_probe, "time_dtypes", fake)
    cache = tmp_path / "dtype_probe.json"
    other = probe_key(threads=torch.get_num_threads() + 7)
    assert other != probe_key() and torch.__version__ in other and dtype_probe.cpu_model() in other
    cache.write_text(json.dumps({other: {"timings": {"float32": 9.0, "bfloat16": 1.0}}}))
    assert probe_timings(cache) == {"float32": 1.0, "bfloat16": 2.0} and fake.calls == 1  # not the other key's
    stored = json.loads(cache.read_text())
    assert set(stored) == {other, probe_key()}  # the other machine's entry is kept


def test_damaged_cache_is_probed_again_and_rewritten(monkeypatch, tmp_path):
    fake = _FakeTiming({"float32": 1.0, "bfloat16": 2.0})
    monkeypatch.setattr(dtype_probe, "time_dtypes", fake)
    cache = tmp_path / "dtype_probe.json"
    cache.write_text("{not json")
    assert fastest_cpu_dtype(cache) is torch.float32 and fake.calls == 1
    assert probe_key() in json.loads(cache.read_text())


def test_default_cache_lives_under_the_project_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_ORPO_CACHE", str(tmp_path / "cache"))
    assert dtype_probe.default_cache_path() == tmp_path / "cache" / "dtype_probe.json"


def test_real_probe_times_both_dtypes_on_a_small_shape():
    shape = (32, 48, 64)
    assert matmul_flops(shape) == 2 * 32 * 48 * 64
    timings = dtype_probe.time_dtypes(shape, repeats=2)
    assert "float32" in timings and all(0 < t < 5 for t in timings.values())
    assert choose_dtype(timings) in ("float32", "bfloat16")
    assert dtype_probe.matmul_rate(torch.float32, shape, repeats=2) > 1e6  # any CPU does a MFLOP/s
