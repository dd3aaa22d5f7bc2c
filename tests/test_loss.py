"""The ORPO loss against closed forms and hand-computed values (see loss.py's docstring)."""

import math

import pytest
import torch
import torch.nn.functional as F

from qlora_orpo.data.collate import IGNORE_INDEX
from qlora_orpo.training.loss import (
    inverse_one_minus_p,
    log1mexp,
    log_odds,
    orpo_logp_grads,
    orpo_loss,
    sequence_logps,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_both_branches_match_a_50_digit_reference(dtype):
    # mpmath (installed with torch, via sympy) evaluates the definition at 50 digits, so the
    # reference has no cancellation of its own; points on both sides of the -ln 2 switch.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    xs = [-30.0, -5.0, -1.0, -0.7, -math.log(2.0), -0.69, -0.1, -1e-3]
    got = log1mexp(torch.tensor(xs, dtype=dtype))
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x)))) for x in xs], dtype=torch.float64)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_extremes_are_finite_and_accurate(dtype):
    x = torch.tensor([-1e4, -100.0, -1e-7, -1e-12], dtype=dtype)
    got = log1mexp(x)
    assert torch.isfinite(got).all()
    # log(1 - e^x) ~ log(-x) for x -> 0-, and ~ -e^x -> -0 for x -> -inf.
    assert got[0].item() == 0.0
    assert abs(got[1].item() + math.exp(-100.0)) < 1e-40
    assert got[2].item() == pytest.approx(math.log(1e-7), rel=1e-6)
    assert got[3].item() == pytest.approx(math.log(1e-12), rel=1e-6)
    # The naive formula fails exactly where the stable one matters.
    naive = torch.log(1 - torch.exp(torch.tensor(-1e-12, dtype=torch.float32)))
    assert torch.isinf(naive)


def test_log1mexp_gradient_is_finite_on_both_branches():
    x = torch.tensor([-1e4, -3.0, -0.5, -1e-9], dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)
    want = -1.0 / torch.expm1(-x.detach())
    torch.testing.assert_close(x.grad, want)


def test_orpo_loss_matches_the_hand_computed_example():
    loss, metrics = orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), torch.tensor([0.5]), beta=0.1)
    # Values worked by hand in loss.py's module docstring.
    assert loss.item() == pytest.approx(0.5170859, abs=1e-6)
    assert metrics["or_loss"].item() == pytest.approx(0.1708592, abs=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(1.6802697, abs=1e-6)
    assert metrics["log_odds_chosen"].item() == pytest.approx(0.4327521, abs=1e-6)
    assert metrics["rewards_chosen"].item() == pytest.approx(-0.05)
    assert metrics["rewards_rejected"].item() == pytest.approx(-0.15)
    assert metrics["reward_margin"].item() == pytest.approx(0.1)
    assert metrics["reward_accuracy"].item() == 1.0
    assert metrics["nll"].item() == pytest.approx(0.5)


def test_orpo_loss_batch_mean_and_accuracy():
    chosen = torch.tensor([-0.5, -2.0])
    rejected = torch.tensor([-1.5, -1.0])
    nll = torch.tensor([0.5, 2.0])
    loss, metrics = orpo_loss(chosen, rejected, nll, beta=0.2)
    ratios = log_odds(chosen) - log_odds(rejected)
    want = 1.25 + 0.2 * sum(math.log1p(math.exp(-r)) for r in ratios.tolist()) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["reward_accuracy"].item() == 0.5
    assert not any(m.requires_grad for m in metrics.values())


def test_orpo_loss_gradcheck_float64():
    chosen = torch.tensor([-0.3, -2.5, -7.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-0.9, -0.2, -8.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([0.3, 2.5, 7.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r, n: orpo_loss(c, r, n, beta=0.1)[0], (chosen, rejected, nll))


def test_closed_form_logp_gradients_equal_autograd():
    chosen = torch.tensor([-0.3, -2.5, -1e-4, -12.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-0.9, -0.2, -3.0, -1e-5], dtype=torch.float64, requires_grad=True)
    beta = 0.25
    # nll independent of logps here, so autograd's d/dlogp is exactly the OR part.
    loss, _ = orpo_loss(chosen, rejected, torch.zeros(4, dtype=torch.float64), beta)
    loss.backward()
    d_chosen, d_rejected = orpo_logp_grads(chosen, rejected, beta)
    torch.testing.assert_close(d_chosen, chosen.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_rejected, rejected.grad, rtol=1e-12, atol=0)


def test_inverse_one_minus_p_closed_form():
    logp = torch.tensor([-0.1, -1.0, -5.0], dtype=torch.float64)
    torch.testing.assert_close(inverse_one_minus_p(logp), 1.0 / (1.0 - logp.exp()))


def test_sequence_logps_from_logits_shifts_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    got = sequence_logps(logits, labels)
    logprobs = logits.log_softmax(-1)
    # Position t predicts label t+1.
    want0 = (logprobs[0, 1, 3] + logprobs[0, 2, 4] + logprobs[0, 3, 1]) / 3
    want1 = (logprobs[1, 0, 2] + logprobs[1, 1, 2]) / 2
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_sequence_logps_from_token_logps_ignores_masked_entries():
    token_logps = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 1, 1]])
    torch.testing.assert_close(sequence_logps(token_logps, labels), torch.tensor([-1.5, -0.5]))


def test_sequence_logps_nll_relation():
    # The response-only NLL per sequence equals -logp: cross-entropy over the same tokens.
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 9, 2]])
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert (-sequence_logps(logits, labels)).item() == pytest.approx(ce.item(), rel=1e-6)


def test_sequence_logps_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sequence_logps(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
