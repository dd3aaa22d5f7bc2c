"""The prompt-shared, packed step (``--step shared``) against the two-sequence step, family by family.

Per-pair log-probs, NLL and LoRA gradients of one packed forward must equal those of
``sequential`` (each side its own sequence) in float32, for rows holding several pairs of
different lengths, one with a truncated prompt, and for Gemma-2 with a sliding window shorter
than the prompt. LoRA dropout is off: the two layouts draw different masks by design.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from peft import LoraConfig, get_peft_model

from qlora_orpo.data.collate import collate_pairs
from qlora_orpo.data.packing import CHOSEN, PADDING, PROMPT, REJECTED, assign_rows, pack_shared, shared_length
from qlora_orpo.data.preferences import PreferencePair
from qlora_orpo.data.templating import tokenize_pair
from qlora_orpo.training.shared import allowed_attention, shared_logps
from qlora_orpo.training.step import OrpoStep, forward_logps

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
TEXTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I can't help with that."),
    ("hello", "hello world to you", "no"),
    (LONG, "the lazy dog sleeps", "the fox jumps over the quick brown dog again and again"),
    ("Tell me about dogs and foxes and which one is quick.", "Foxes are quick.", "Dogs."),
]


def tokenized_pairs(tokenizer, truncate_third: bool = True):
    out = []
    for row, (prompt, chosen, rejected) in enumerate(TEXTS, start=1):
        pair = PreferencePair(({"role": "user", "content": prompt},), chosen, rejected, row, "pairs.jsonl")
        # The third prompt is cut to 24 tokens (max_prompt_length), the others kept whole.
        max_prompt = 24 if truncate_third and row == 3 else 200
        tokenized, _ = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=max_prompt)
        out.append(tokenized)
    assert out[2].truncated == truncate_third
    return out


def lora_model(name: str, attn: str | None = None):
    """``attn``: force eager or SDPA attention (default: the family's own; Gemma-2's soft-capping needs eager)."""
    family = FAMILIES[name]
    tokenizer = family.build_tokenizer()
    model = family.build_model(tokenizer)
    if attn is not None:
        model.config._attn_implementation = attn
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model, tokenizer


def per_side(model, pairs, nll_over_prompt=False):
    """Each pair's two sides as their own sequences: the reference."""
    chosen, rejected, nll = [], [], []
    for pair in pairs:
        batch = collate_pairs([pair], pad_token_id=0)
        c = forward_logps(model, batch.chosen, chunk_size=7, nll_over_prompt=nll_over_prompt)
        r = forward_logps(model, batch.rejected, chunk_size=7, nll_over_prompt=nll_over_prompt)
        chosen.append(c.logps), rejected.append(r.logps), nll.append(c.nll)
    return torch.cat(chosen), torch.cat(rejected), torch.cat(nll)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("pack_tokens", [0, 60])
def test_shared_logps_equal_each_side_run_alone(name, pack_tokens):
    model, tokenizer = lora_model(name)
    pairs = tokenized_pairs(tokenizer)
    batch = pack_shared(pairs, tokenizer.pad_token_id, pack_tokens=pack_tokens)
    if pack_tokens:
        assert batch.input_ids.shape[0] > 1  # several rows, padded to the longest
    with torch.no_grad():
        got = shared_logps(model, batch, chunk_size=5)
        want = per_side(model, pairs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, attn", [("llama3", "eager"), ("llama3", "sdpa"), ("mistral", "eager"), ("mistral", "sdpa"),
                   ("gemma2", "eager"), ("phi3", None), ("qwen2", None), ("plain", None)],
)
def test_shared_step_gradients_equal_sequential(name, attn):
    model, tokenizer = lora_model(name, attn)
    pairs = tokenized_pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)

    def grads(mode, **kw):
        model.zero_grad(set_to_none=True)
        out = OrpoStep(model, beta=0.5, mode=mode, chunk_size=5, pad_token_id=tokenizer.pad_token_id, **kw)(
            batch, loss_scale=0.5)
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_out, ref = grads("sequential")
    out, got = grads("shared", pack_tokens=70)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_nll_over_prompt_scores_the_prompt_once_with_the_chosen_reply():
    model, tokenizer = lora_model("qwen2")
    pairs = tokenized_pairs(tokenizer)
    with torch.no_grad():
        got = shared_logps(model, pack_shared(pairs, tokenizer.pad_token_id), chunk_size=5, nll_over_prompt=True)
        want = per_side(model, pairs, nll_over_prompt=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[2], -got[0])  # the prompt's tokens count in the NLL


def test_a_pair_alone_and_packed_with_others_gives_the_same_loss():
    model, tokenizer = lora_model("llama3")
    pairs = tokenized_pairs(tokenizer)
    step = OrpoStep(model, beta=0.5, mode="shared", chunk_size=5, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        alone = shared_logps(model, pack_shared(pairs[1:2], tokenizer.pad_token_id), chunk_size=5)
        packed = shared_logps(model, pack_shared(pairs, tokenizer.pad_token_id), chunk_size=5)
    for a, p in zip(alone, packed, strict=True):
        torch.testing.assert_close(a[0], p[1], rtol=1e-5, atol=1e-6)
    assert step(collate_pairs(pairs[1:2], tokenizer.pad_token_id)).loss.isfinite()


def test_layout_positions_spans_and_the_seam():
    """The rejected reply continues the prompt's positions, and its first token is scored from the prompt's end."""
    from qlora_orpo.data.collate import TokenizedPair

    a = TokenizedPair((1, 2, 3), (4, 5), (6, 7, 8), row=1)
    b = TokenizedPair((9,), (10,), (11, 12), row=2)
    batch = pack_shared([a, b], pad_token_id=0, pack_tokens=0, pad_to_multiple_of=16)
    assert batch.input_ids[0, :12].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert batch.position_ids[0, :12].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 2]
    assert batch.span[0, :12].tolist() == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3 + [PROMPT, CHOSEN] + [REJECTED] * 2
    assert batch.span[0, 12:].eq(PADDING).all() and batch.input_ids.shape == (1, 16)
    assert batch.chosen_source.tolist() == [2, 3, 8] and batch.chosen_target.tolist() == [4, 5, 10]
    assert batch.rejected_source.tolist() == [2, 5, 6, 8, 10] and batch.rejected_target.tolist() == [6, 7, 8, 11, 12]
    assert batch.rejected_pair.tolist() == [0, 0, 0, 1, 1]
    assert batch.num_tokens == 12
    allowed = allowed_attention(batch)[0, 0]
    assert allowed[5, 2] and not allowed[5, 3] and not allowed[5, 4]  # rejected sees the prompt, not the chosen
    assert not allowed[8, 7] and allowed[8, 8]  # the next pair sees nothing of the previous one
    assert allowed[14, 14] and not allowed[14, 13]  # padding attends to itself only (no all-masked row)
    window = allowed_attention(batch, window=2)[0, 0]
    assert window[5, 2] and not window[6, 2]  # position 3 sees position 2 (3 - 2 < 2), position 4 does not


def test_rows_take_pairs_up_to_the_budget():
    from qlora_orpo.data.collate import TokenizedPair

    pairs = [TokenizedPair((1,) * n, (2,), (3,), row=i) for i, n in enumerate([8, 8, 28, 3])]
    assert [shared_length(p) for p in pairs] == [10, 10, 30, 5]
    assert assign_rows(pairs, 20) == [[0, 1], [2], [3]]
    assert assign_rows(pairs, 0) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("nll_over_prompt", [False, True])
def test_evaluation_in_the_shared_layout_gives_the_same_scores(nll_over_prompt):
    from qlora_orpo.evaluation.scoring import score_pairs

    model, tokenizer = lora_model("gemma2")
    pairs = tokenized_pairs(tokenizer)
    kw = {"batch_size": 3, "chunk_size": 5, "nll_over_prompt": nll_over_prompt, "progress": False}
    sides = score_pairs(model, pairs, tokenizer.pad_token_id, **kw)
    shared = score_pairs(model, pairs, tokenizer.pad_token_id, shared=True, pack_tokens=50, **kw)
    for a, b in zip((sides.chosen_logps, sides.rejected_logps, sides.chosen_nll),
                    (shared.chosen_logps, shared.rejected_logps, shared.chosen_nll), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert model.training  # score_pairs puts the model back as it found it


def test_accumulating_packed_rows_of_different_pair_counts_gives_the_mean_over_pairs():
    """Two micro-batches of two pairs, one packed into a single row and one into two rows, each
    backward scaled by 1/grad_accum as the loop does: the gradient of the mean loss over all four."""
    model, tokenizer = lora_model("llama3")
    pairs = tokenized_pairs(tokenizer)
    pad = tokenizer.pad_token_id
    lengths = [shared_length(p) for p in pairs]
    budget = max(lengths[0] + lengths[1], max(lengths))  # pairs 0+1 share a row; 2 and 3 cannot
    assert lengths[2] + lengths[3] > budget
    rows = [pack_shared(pairs[i:i + 2], pad, pack_tokens=budget).input_ids.shape[0] for i in (0, 2)]
    assert rows == [1, 2]

    def grads(mode, micro_batches, scale, **kw):
        model.zero_grad(set_to_none=True)
        step = OrpoStep(model, beta=0.5, mode=mode, chunk_size=5, pad_token_id=pad, **kw)
        losses = [step(collate_pairs(mb, pad), loss_scale=scale).loss for mb in micro_batches]
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (whole,), want = grads("sequential", [pairs], 1.0)
    losses, got = grads("shared", [pairs[:2], pairs[2:]], 0.5, pack_tokens=budget)
    torch.testing.assert_close(sum(losses) / 2, whole, rtol=1e-5, atol=1e-6)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
