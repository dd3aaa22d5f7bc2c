"""Defects found by a code read (issue 20), each pinned by a test that failed before its fix.

Pure functions and small files here; the faults injected into whole runs (kill -9, a full
disk, a damaged checkpoint) are in ``test_faults.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlora_orpo.config import OrpoConfig
from qlora_orpo.training.loss import inverse_one_minus_p, log1mexp, orpo_logp_grads, orpo_loss
from qlora_orpo.training.optim import total_optimizer_steps

# -- numerics: a mean log-prob of exactly 0.0 -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_mean_logprob_of_zero_gives_a_finite_loss_and_finite_gradients(dtype):
    # A short memorised reply in float32: every token's log-prob rounds to 0, so the mean is 0.0.
    chosen = torch.tensor([0.0, -0.5], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.5, 0.0], dtype=dtype, requires_grad=True)
    nll = -chosen
    loss, metrics = orpo_loss(chosen, rejected, nll, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    d_chosen, d_rejected = orpo_logp_grads(chosen, rejected, beta=0.1)
    assert torch.isfinite(d_chosen).all() and torch.isfinite(d_rejected).all()
    assert torch.isfinite(inverse_one_minus_p(torch.zeros(1, dtype=dtype))).all()
    # Both sides at 0.0: no inf - inf.
    both = torch.zeros(1, dtype=dtype, requires_grad=True)
    loss, _ = orpo_loss(both, both.clone(), -both, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(both.grad).all()


def test_the_clamp_leaves_resolvable_values_exact():
    x = torch.tensor([-1e-12, -1e-7, -0.5, -3.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # The square of the largest coefficient stays finite in float32 (a gradient norm squares it).
    assert torch.isfinite(inverse_one_minus_p(torch.zeros(1)) ** 2).all()


# -- epochs mode under several ranks ---------------------------------------------------------


def test_epochs_mode_total_steps_account_for_the_world_size():
    cfg = OrpoConfig(max_steps=0, epochs=2, batch_size=2, grad_accum=4)
    # 100 pairs, 8 per optimizer step per rank: one rank needs 25 steps for 2 epochs, 4 ranks 7.
    assert total_optimizer_steps(cfg, 100) == 25
    assert total_optimizer_steps(cfg, 100, world_size=1) == 25
    assert total_optimizer_steps(cfg, 100, world_size=4) == math.ceil(2 * 100 / (2 * 4 * 4))
    assert total_optimizer_steps(OrpoConfig(max_steps=7), 100, world_size=4) == 7  # max_steps is steps
