"""Parity with the peer: our ORPO loss equals TRL's own ``ORPOTrainer`` loss on the same batch.

TRL computes its NLL over prompt + response, ours over the response by default. With
``nll_over_prompt=True`` the two losses (and their gradients) agree; with our default only
the NLL term differs. trl is a test dependency (the ``bench`` extra, installed by ``make
setup``): a missing trl fails this module instead of skipping it.
"""

from __future__ import annotations

import pytest
import torch
import trl  # noqa: F401  -- deliberately plain: a missing peer is a failure, not a skip
from conftest import build_tiny_llama, build_tokenizer
from peft import LoraConfig, get_peft_model
from trl.experimental.orpo import ORPOTrainer

from qlora_orpo.bench.trl_adapter import trl_inputs, trl_loss, trl_trainer
from qlora_orpo.data.collate import TokenizedPair, collate_pairs
from qlora_orpo.training.step import OrpoStep

BETA = 0.25
RTOL = 1e-4


def random_ids(generator: torch.Generator, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(torch.randint(5, vocab, (n,), generator=generator).tolist())


def make_pairs(vocab: int, eos: int, chosen_total: int | None = 14) -> list[TokenizedPair]:
    """Three pairs; the prompt + chosen sides all have ``chosen_total`` tokens unless it is None.

    Equal chosen lengths matter for the prompt-inclusive NLL: TRL averages over every chosen
    token of the batch at once, we average per sequence and then over the batch; the two
    agree when the sequences are equally long (see test_trl_nll_is_token_weighted).
    """
    g = torch.Generator().manual_seed(7)
    pairs = []
    for row, prompt_len in enumerate((3, 5, 8)):
        chosen_len = (chosen_total - prompt_len) if chosen_total else 3 + 4 * row
        rejected_len = 2 + 3 * row  # the rejected sides differ in length, so padding is exercised
        pairs.append(TokenizedPair(
            random_ids(g, prompt_len, vocab),
            random_ids(g, chosen_len - 1, vocab) + (eos,),
            random_ids(g, rejected_len - 1, vocab) + (eos,),
            row=row + 1,
        ))
    return pairs


@pytest.fixture
def setup(tmp_path):
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer))
    # init_lora_weights=False: B is random, so the adapter is not the identity and all LoRA weights get gradients.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    model.train()
    trainer = trl_trainer(model, tokenizer, BETA, max_length=64, output_dir=tmp_path / "trl")
    assert isinstance(trainer, ORPOTrainer) and trainer.beta == BETA
    return model, tokenizer, trainer


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trl_step(model, trainer, batch):
    model.zero_grad(set_to_none=True)
    loss, metrics = trl_loss(trainer, model, batch)
    loss.backward()
    return loss.detach(), metrics, lora_grads(model)


def our_step(model, tokenizer, batch, mode: str, nll_over_prompt: bool):
    model.zero_grad(set_to_none=True)
    step = OrpoStep(model, BETA, mode, chunk_size=5, nll_over_prompt=nll_over_prompt,
                    pad_token_id=tokenizer.pad_token_id)
    out = step(batch)
    return out.loss, {k: float(v) for k, v in out.metrics.items()}, lora_grads(model)


def test_trl_inputs_carry_our_batch(setup):
    _, tokenizer, _ = setup
    batch = collate_pairs(make_pairs(len(tokenizer), tokenizer.eos_token_id), tokenizer.pad_token_id)
    inputs = trl_inputs(batch)
    assert set(inputs) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}
    assert torch.equal(inputs["rejected_labels"], batch.rejected.labels)
    # TRL's own concatenation of them is ours: chosen rows, then rejected rows, padded to the longer side.
    joint = ORPOTrainer.concatenated_inputs(inputs, padding_value=tokenizer.pad_token_id)
    assert joint["concatenated_input_ids"].shape == (6, max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1]))


@pytest.mark.parametrize("mode", ["joint", "split"])
def test_loss_and_gradients_equal_trl_with_nll_over_prompt(setup, mode):
    model, tokenizer, trainer = setup
    batch = collate_pairs(make_pairs(len(tokenizer), tokenizer.eos_token_id), tokenizer.pad_token_id)
    theirs, their_metrics, their_grads = trl_step(model, trainer, batch)
    ours, our_metrics, our_grads = our_step(model, tokenizer, batch, mode, nll_over_prompt=True)

    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    for key in ("nll", "or_loss", "log_odds_ratio", "reward_margin"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=RTOL, abs=1e-7), key
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_default_response_only_nll_differs_only_in_the_nll_term(setup):
    model, tokenizer, trainer = setup
    batch = collate_pairs(make_pairs(len(tokenizer), tokenizer.eos_token_id), tokenizer.pad_token_id)
    theirs, their_metrics, _ = trl_step(model, trainer, batch)
    ours, our_metrics, _ = our_step(model, tokenizer, batch, "split", nll_over_prompt=False)

    # The odds-ratio term and everything built on the response log-probs are the same ...
    for key in ("or_loss", "log_odds_ratio", "reward_margin"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=RTOL, abs=1e-7), key
    # ... and the losses differ by exactly the difference of the NLL terms.
    nll_difference = our_metrics["nll"] - their_metrics["nll"]
    assert abs(nll_difference) > 1e-3  # the prompt tokens really are left out
    assert float(ours - theirs) == pytest.approx(nll_difference, rel=RTOL, abs=1e-6)


def test_trl_nll_is_token_weighted(setup):
    """With chosen sides of different lengths, TRL's NLL weights tokens, ours weights sequences.

    Documented here so that the parity condition above (equal chosen lengths, or batch 1) is a
    fact, not an assumption: TRL's NLL is the token-weighted mean of our per-sequence NLLs.
    """
    model, tokenizer, trainer = setup
    model.eval()
    pairs = make_pairs(len(tokenizer), tokenizer.eos_token_id, chosen_total=None)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        _, their_metrics = trl_loss(trainer, model, batch)
        from qlora_orpo.training.step import forward_logps

        per_sequence = forward_logps(model, batch.chosen, chunk_size=5, nll_over_prompt=True).nll
    predicted = (batch.chosen.attention_mask.sum(1) - 1).double()  # tokens with a prediction
    weighted = float((per_sequence.double() * predicted).sum() / predicted.sum())
    assert their_metrics["nll"] == pytest.approx(weighted, rel=RTOL)
    assert their_metrics["nll"] != pytest.approx(float(per_sequence.mean()), rel=1e-3)
