"""Confidence intervals against direct computations written here."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_orpo.evaluation.stats import paired_bootstrap, wilson_interval, z_value


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = (z / (1 + z * z / n)) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(81, 263), (0, 10), (10, 10), (59, 118), (1, 2)])
def test_wilson_interval_equals_the_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_wilson_interval_known_values_and_edges():
    # A textbook value: 0 successes of 10 gives (0, 0.2775) at 95% (Brown, Cai & DasGupta 2001).
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.27753, abs=1e-5)
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]  # more pairs, tighter interval
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_paired_bootstrap_is_seeded_and_matches_the_normal_interval_for_many_pairs():
    g = torch.Generator().manual_seed(0)
    # Accuracy differences of 400 pairs: +1 (turned right) 15%, -1 (turned wrong) 5%, else 0.
    u = torch.rand(400, generator=g)
    diffs = torch.where(u < 0.15, 1.0, torch.where(u < 0.20, -1.0, 0.0)).double()
    mean, low, high = paired_bootstrap(diffs, resamples=20_000, seed=1)
    assert mean == pytest.approx(diffs.mean().item())
    se = diffs.std(unbiased=False).item() / math.sqrt(len(diffs))
    assert low == pytest.approx(mean - 1.96 * se, abs=0.01)
    assert high == pytest.approx(mean + 1.96 * se, abs=0.01)
    assert paired_bootstrap(diffs, resamples=20_000, seed=1) == (mean, low, high)


def test_paired_bootstrap_degenerate_inputs():
    assert paired_bootstrap([0.25] * 7) == pytest.approx((0.25, 0.25, 0.25))
    assert all(math.isnan(v) for v in paired_bootstrap([]))
    mean, low, high = paired_bootstrap([1.0, -1.0] * 50)
    assert mean == 0.0 and low < 0.0 < high  # no gain: the interval straddles zero
