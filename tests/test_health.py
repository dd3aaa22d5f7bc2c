"""Generation health: the metrics equal direct computations on hand-made token lists; batched greedy
generation with left padding equals one prompt at a time; the gate and the selection of the best checkpoint."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from qlora_orpo.data.templating import render_prompt, stop_token_ids
from qlora_orpo.evaluation.health import (
    Reply,
    compare_health,
    distinct_n,
    ended_rate,
    generate_greedy,
    health_gate,
    median_length_ratio,
    select_prompts,
    seq_rep_n,
    split_reply,
    summarise_replies,
)


def test_seq_rep_4_on_hand_made_lists():
    # 1 2 3 4 1 2 3 4 1: 4-grams 1234 2341 3412 4123 1234 2341 -> 4 distinct of 6.
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4, 1]) == pytest.approx(1 - 4 / 6)
    assert seq_rep_n([5, 6, 7, 8, 9]) == 0.0  # no repeated 4-gram
    assert seq_rep_n([7] * 10) == pytest.approx(1 - 1 / 7)  # a loop: 7 4-grams, 1 distinct
    assert seq_rep_n([1, 2, 3]) == 0.0  # shorter than n: no 4-gram
    assert seq_rep_n([1, 2, 1, 2, 1], n=2) == pytest.approx(1 - 2 / 4)


def test_distinct_2_pools_replies():
    replies = [[1, 2, 3], [1, 2, 4], [9]]
    # 2-grams: (1,2) (2,3) (1,2) (2,4); none from [9] -> 3 distinct of 4.
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 2) == pytest.approx(3 / 5)  # (1,2) (2,3) (3,1) (1,2) (2,3)
    assert distinct_n([[1], []], 2) == 0.0


def test_ended_rate_length_ratio_and_split():
    assert ended_rate([True, False, True, True]) == 0.75
    # Ratios 2/4, 6/3, 3/3 -> median 1.0; a base length of 0 counts as 1.
    assert median_length_ratio([2, 6, 3], [4, 3, 3]) == 1.0
    assert median_length_ratio([5], [0]) == 5.0
    assert split_reply([5, 6, 2, 0, 0], stop_ids=[2, 9]) == ([5, 6], True)
    assert split_reply([5, 6, 7], stop_ids=[2]) == ([5, 6, 7], False)
    replies = [Reply([1, 2, 3, 4, 1, 2, 3, 4], True, "a"), Reply([5, 5, 5, 5, 5], False, "b")]
    summary = summarise_replies(replies)
    assert summary["ended_rate"] == 0.5
    assert summary["seq_rep_4"] == pytest.approx(statistics.fmean([1 - 4 / 5, 1 - 1 / 2]))
    assert summary["distinct_2"] == pytest.approx(distinct_n([r.ids for r in replies], 2))
    assert summary["median_length"] == 6.5
    change = compare_health(summary, summary, replies, replies[::-1])
    assert change["ended_rate"] == 0.0 and change["median_length_ratio"] == pytest.approx((8 / 5 + 5 / 8) / 2)


def test_health_gate():
    base = {"ended_rate": 0.30, "seq_rep_4": 0.17}
    assert health_gate(base, {"ended_rate": 0.26, "seq_rep_4": 0.21})[0]  # within 5 points / 0.05
    ok, why = health_gate(base, {"ended_rate": 0.20, "seq_rep_4": 0.30})
    assert not ok and "end-of-turn" in why and "seq-rep-4" in why


@pytest.fixture
def chat_model():
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer), seed=1)
    # Make the end-of-turn token win wherever token 263 would (greedy picks it in some replies, not all).
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = head[263]  # a tie, and argmax takes the lower id
    model.eval()
    return model, tokenizer


PROMPTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "What is the capital of France? Tell me about the quick brown fox."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "the lazy dog"}],
    [{"role": "user", "content": "water flour salt yeast, then knead, then bake it in the oven"}],
]


@torch.no_grad()
def one_at_a_time(model, tokenizer, messages, max_new_tokens):
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = stop_token_ids(tokenizer)
    out = ids
    for _ in range(max_new_tokens):  # plain greedy decoding, no cache, no padding
        token = int(model(input_ids=out).logits[0, -1].argmax())
        if token in stops:
            return out[0, ids.shape[1]:].tolist(), True
        out = torch.cat([out, torch.tensor([[token]])], dim=1)
    return out[0, ids.shape[1]:].tolist(), False


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(chat_model):
    model, tokenizer = chat_model
    replies = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    expected = [one_at_a_time(model, tokenizer, p, 12) for p in PROMPTS]
    assert [(r.ids, r.ended) for r in replies] == expected
    assert any(r.ended for r in replies) and any(not r.ended for r in replies)  # both cases exercised
    assert all(len(r.ids) <= 12 for r in replies)


def test_select_prompts_is_fixed_distinct_and_fits(chat_model):
    _, tokenizer = chat_model

    class Pair:  # only .prompt is read
        def __init__(self, prompt):
            self.prompt = tuple(prompt)

    def length(messages):
        return len(tokenizer(render_prompt(tokenizer, list(messages)), add_special_tokens=False)["input_ids"])

    pairs = [Pair(PROMPTS[0]), Pair(PROMPTS[0]), Pair(PROMPTS[4]), Pair(PROMPTS[3]), Pair(PROMPTS[2])]
    limit = max(length(PROMPTS[0]), length(PROMPTS[3]))
    assert length(PROMPTS[4]) > limit  # the long one is skipped, not cut
    chosen = select_prompts(pairs, tokenizer, count=2, max_prompt_length=limit)
    assert chosen == [tuple(PROMPTS[0]), tuple(PROMPTS[3])]  # in data order, the duplicate once
    assert len(select_prompts(pairs, tokenizer, count=9, max_prompt_length=10_000)) == 4
