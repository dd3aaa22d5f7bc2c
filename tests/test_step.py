"""The memory-aware step: chunked log-probs equal plain ones; split/sequential/joint gradients agree."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, random_tokenized_pairs
from peft import LoraConfig, get_peft_model

from qlora_orpo.data.collate import IGNORE_INDEX, SideBatch, TokenizedPair, collate_pairs
from qlora_orpo.training.head import OutputHead, chunked_token_logps, head_is_frozen
from qlora_orpo.training.loss import orpo_loss, sequence_logps
from qlora_orpo.training.step import OrpoStep, forward_logps

VOCAB = 97


def tiny_lora_model(dropout: float = 0.0, dtype=torch.float32, checkpointing: bool = True, lora_on_head: bool = False):
    model = build_tiny_llama(vocab_size=VOCAB).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # init_lora_weights=False: B is random too, so the adapter is non-identity and every
    # LoRA matrix gets a non-zero gradient.
    targets = "all-linear" if not lora_on_head else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    return random_tokenized_pairs(n, VOCAB, seed, min_length=3)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_step(model, batch, mode, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = OrpoStep(model, beta=0.5, mode=mode, chunk_size=5, **kw)(batch, loss_scale=0.5)
    return out, lora_grads(model)


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_token_logps_equal_plain_logits_and_gradients():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, VOCAB, bias=False).double()
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX
    chunked = chunked_token_logps(hidden, lm_head, labels, chunk_size=4)
    got = sequence_logps(chunked.double(), labels[:, 1:])
    want = sequence_logps(lm_head(hidden), labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # chunk math runs in float32
    (g_chunked,) = torch.autograd.grad(got.sum(), hidden)
    (g_plain,) = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-5, atol=1e-7)
    assert (chunked[labels[:, 1:] == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_chunk_gradient_equals_the_checkpointed_chunk(dtype):
    """A frozen head computes each chunk's hidden-state gradient in the forward (no recomputation)."""
    torch.manual_seed(0)
    frozen = torch.nn.Linear(16, VOCAB, bias=False).to(dtype).requires_grad_(False)
    trainable = torch.nn.Linear(16, VOCAB, bias=False).to(dtype)
    trainable.weight.data.copy_(frozen.weight)
    assert head_is_frozen(frozen) and not head_is_frozen(trainable)
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[1, :5] = IGNORE_INDEX
    weights = torch.randn(3, 10, dtype=torch.float32)  # distinct upstream gradient per token
    grads = []
    for head in (frozen, trainable):
        hidden = torch.randn(3, 11, 16, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        logps = chunked_token_logps(hidden, head, labels, chunk_size=4)
        (grad,) = torch.autograd.grad((weights * logps).sum(), hidden)
        grads.append((logps.detach(), grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lora_on_head", [False, True])
def test_split_gradient_equals_joint_with_and_without_lora_on_lm_head(lora_on_head):
    model = tiny_lora_model(lora_on_head=lora_on_head)
    assert head_is_frozen(OutputHead(model)) is not lora_on_head
    batch = collate_pairs(random_pairs(3), pad_token_id=0)
    _, joint = run_step(model, batch, "joint")
    _, split = run_step(model, batch, "split")
    assert any("lm_head" in n for n in split) is lora_on_head
    assert_grads_close(split, joint)


def test_forward_logps_equal_full_logits_path():
    model = tiny_lora_model(checkpointing=False)
    batch = collate_pairs(random_pairs(3), pad_token_id=0)
    side = batch.chosen
    ours = forward_logps(model, side, chunk_size=3)
    logits = model(input_ids=side.input_ids, attention_mask=side.attention_mask).logits
    torch.testing.assert_close(ours.logps, sequence_logps(logits, side.labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.nll, -ours.logps)


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_split_gradient_equals_joint_loss_gradient(mode):
    model = tiny_lora_model()
    batch = collate_pairs(random_pairs(3), pad_token_id=0)
    split_out, split_grads = run_step(model, batch, "split")
    other_out, other_grads = run_step(model, batch, mode)
    assert all(g.abs().sum() > 0 for g in split_grads.values()), "every LoRA matrix must get a gradient"
    torch.testing.assert_close(split_out.loss, other_out.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(split_grads, other_grads)
    for key in split_out.metrics:
        torch.testing.assert_close(split_out.metrics[key], other_out.metrics[key], rtol=1e-5, atol=1e-6)


def test_split_gradient_is_exact_with_lora_dropout():
    # With dropout, the reference is the joint loss under the same masks the split step
    # draws: rejected forward first (the no-grad pass (a) consumed the RNG there), then chosen.
    model = tiny_lora_model(dropout=0.3)
    batch = collate_pairs(random_pairs(2, seed=3), pad_token_id=0)
    out, split_grads = run_step(model, batch, "split")

    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    rejected = forward_logps(model, batch.rejected, chunk_size=5)
    chosen = forward_logps(model, batch.chosen, chunk_size=5)
    loss, _ = orpo_loss(chosen.logps, rejected.logps, chosen.nll, beta=0.5)
    (loss * 0.5).backward()
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-6, atol=1e-7)
    assert_grads_close(split_grads, lora_grads(model))


def test_split_without_rng_restore_would_differ_under_dropout(monkeypatch):
    # Guards the RNG fork: if (c) drew a fresh mask the gradient would change.
    import qlora_orpo.training.step as step

    model = tiny_lora_model(dropout=0.3)
    batch = collate_pairs(random_pairs(2, seed=3), pad_token_id=0)
    _, exact = run_step(model, batch, "split")
    monkeypatch.setattr(step, "_restore_rng", lambda device, state: None)
    _, broken = run_step(model, batch, "split")
    assert any(not torch.allclose(exact[n], broken[n], rtol=1e-4) for n in exact)


def test_nll_over_prompt_changes_only_the_nll_term():
    model = tiny_lora_model(checkpointing=False)
    batch = collate_pairs(random_pairs(2), pad_token_id=0)
    response_only, _ = run_step(model, batch, "split")
    with_prompt, _ = run_step(model, batch, "split", nll_over_prompt=True)
    for key in ("or_loss", "log_odds_ratio", "reward_margin", "reward_accuracy"):
        torch.testing.assert_close(response_only.metrics[key], with_prompt.metrics[key])
    assert not torch.allclose(response_only.metrics["nll"], with_prompt.metrics["nll"])
    # The loss differs by exactly the NLL difference.
    torch.testing.assert_close(
        with_prompt.loss - response_only.loss,
        with_prompt.metrics["nll"] - response_only.metrics["nll"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_prompt_nll_matches_cross_entropy_over_all_tokens():
    model = tiny_lora_model(checkpointing=False)
    batch = collate_pairs(random_pairs(1), pad_token_id=0)
    side: SideBatch = batch.chosen
    ours = forward_logps(model, side, chunk_size=4, nll_over_prompt=True)
    logits = model(input_ids=side.input_ids).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], side.input_ids[0, 1:])
    torch.testing.assert_close(ours.nll[0], ce, rtol=1e-5, atol=1e-6)


def test_extra_right_padding_does_not_change_logps():
    model = tiny_lora_model(checkpointing=False)
    pairs = random_pairs(3)
    plain = collate_pairs(pairs, pad_token_id=0)
    padded = collate_pairs(pairs, pad_token_id=0, pad_to_multiple_of=32)
    assert padded.chosen.input_ids.shape[1] == 32
    for a, b in ((plain.chosen, padded.chosen), (plain.rejected, padded.rejected)):
        torch.testing.assert_close(forward_logps(model, a, 4).logps, forward_logps(model, b, 4).logps, rtol=1e-5, atol=1e-6)
