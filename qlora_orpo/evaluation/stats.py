"""Confidence intervals for held-out figures: is a change a gain, or the noise of n pairs?

* :func:`wilson_interval`: the Wilson score interval of a proportion (reward accuracy of one
  model). Unlike the textbook ``p +- z sqrt(p(1-p)/n)`` it stays inside [0, 1] and keeps its
  coverage near 0 and 1 and for small n (Brown, Cai & DasGupta 2001).
* :func:`paired_bootstrap`: an interval for the mean of per-pair differences (adapter minus
  base on the *same* pairs). Base and adapter are scored on one set of pairs, so their
  errors are strongly correlated: most pairs are right (or wrong) for both, and only the
  pairs that flip carry the difference. Two separate Wilson intervals ignore that and are far
  too wide; the paired interval is what says whether a gain excludes zero.

Both are pure functions of numbers; no model, no config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile: 1.959964 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """``(low, high)`` of the Wilson score interval for ``successes`` out of ``n``.

    centre = (p + z^2 / 2n) / (1 + z^2 / n),
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
    ``n == 0`` says nothing: ``(0.0, 1.0)``.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # Clamp rounding only: mathematically the interval lies within [0, 1] already.
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(
    differences: Sequence[float] | torch.Tensor,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-pair ``differences`` ``(n,)`` and its percentile bootstrap interval.

    Resamples the pairs with replacement ``resamples`` times (seeded, so a report is
    reproducible) and takes the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles
    of the resampled means. For an accuracy gain, a difference is -1, 0 or +1 per pair (right
    for one model only, or for both/neither). No normality assumed; with all differences
    equal the interval collapses onto them. An empty input gives NaNs.
    """
    values = torch.as_tensor(differences, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return math.nan, math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    block = max(1, 4_000_000 // n)  # (block, n) indices at a time: bounded memory for any n
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        index = torch.randint(0, n, (count, n), generator=generator)
        means[start : start + count] = values[index].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return values.mean().item(), low, high
