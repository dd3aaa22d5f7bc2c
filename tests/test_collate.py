"""Tokenisation rules: chat template, response-only labels, EOS, truncation, drops."""

from __future__ import annotations

import torch

from qlora_orpo.data.collate import IGNORE_INDEX, collate_pairs, concat_sides
from qlora_orpo.data.preferences import PreferencePair
from qlora_orpo.data.templating import render_prompt, tokenize_pair, tokenize_pairs


def make_pair(prompt="What is the capital of France?", chosen="The capital of France is Paris.",
              rejected="I can't help with that.", row=1, history=()):
    messages = tuple(history) + ({"role": "user", "content": prompt},)
    return PreferencePair(prompt=messages, chosen=chosen, rejected=rejected, row=row, source="test")


def test_chat_template_prompt_and_response_only_labels(tiny_tokenizer):
    pair = make_pair()
    tokenized, _ = tokenize_pair(pair, tiny_tokenizer, max_length=256, max_prompt_length=128)
    prompt_text = tiny_tokenizer.decode(tokenized.prompt_ids)
    assert prompt_text.startswith("<|im_start|>user\n")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(tokenized.chosen_ids[:-1]) == pair.chosen
    assert tokenized.chosen_ids[-1] == tiny_tokenizer.eos_token_id
    assert tokenized.rejected_ids[-1] == tiny_tokenizer.eos_token_id

    batch = collate_pairs([tokenized], pad_token_id=tiny_tokenizer.pad_token_id)
    side = batch.chosen
    n_prompt = len(tokenized.prompt_ids)
    labels = side.labels[0]
    # Labels cover exactly the response tokens (text + EOS), nothing of the prompt.
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert scored == list(tokenized.chosen_ids)
    assert tiny_tokenizer.decode(scored) == pair.chosen + "<|im_end|>"
    # The prompt-inclusive labels cover every real token.
    assert (side.prompt_labels[0] == side.input_ids[0]).all()


def test_chat_template_matches_full_conversation_rendering(tiny_tokenizer):
    # Prompt + response tokens equal the template's own rendering of the whole conversation
    # up to the assistant's end-of-turn token: our split loses nothing and adds nothing.
    pair = make_pair(history=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}])
    tokenized, _ = tokenize_pair(pair, tiny_tokenizer, max_length=256, max_prompt_length=200)
    full = tiny_tokenizer.apply_chat_template(
        list(pair.prompt) + [{"role": "assistant", "content": pair.chosen}], tokenize=False
    )
    ours = tiny_tokenizer.decode(list(tokenized.prompt_ids) + list(tokenized.chosen_ids))
    assert full.startswith(ours)
    assert full[len(ours):] == "\n"  # the template's newline after <|im_end|> is not a label


def test_prompt_tokens_identical_for_chosen_and_rejected(tiny_tokenizer):
    tokenized, _ = tokenize_pair(make_pair(), tiny_tokenizer, 256, 128)
    batch = collate_pairs([tokenized], tiny_tokenizer.pad_token_id)
    n = len(tokenized.prompt_ids)
    assert torch.equal(batch.chosen.input_ids[0, :n], batch.rejected.input_ids[0, :n])


def test_plain_tokenizer_concatenates_prompt_and_response(plain_tokenizer):
    pair = make_pair(prompt="hello world ", chosen="the quick brown fox", rejected="the lazy dog")
    assert render_prompt(plain_tokenizer, pair.prompt) == "hello world "
    tokenized, _ = tokenize_pair(pair, plain_tokenizer, 256, 128)
    assert plain_tokenizer.decode(tokenized.prompt_ids) == "hello world "
    assert plain_tokenizer.decode(tokenized.chosen_ids) == "the quick brown fox<|im_end|>"


def test_plain_tokenizer_renders_conversation_turns(plain_tokenizer):
    pair = make_pair(history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], prompt="bye")
    assert render_prompt(plain_tokenizer, pair.prompt) == "User: hi\n\nAssistant: hello\n\nUser: bye\n\nAssistant:"
    tokenized, _ = tokenize_pair(pair, plain_tokenizer, 256, 128)
    assert plain_tokenizer.decode(tokenized.chosen_ids).startswith(" The capital")


def test_prompt_truncated_from_the_left_then_response_to_fit(tiny_tokenizer):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)
    pair = make_pair(prompt=long_prompt, chosen=" ".join(["hello world"] * 20))
    full, _ = tokenize_pair(pair, tiny_tokenizer, max_length=10_000, max_prompt_length=10_000)
    cut, info = tokenize_pair(pair, tiny_tokenizer, max_length=40, max_prompt_length=16)
    assert info["truncated_prompt"] == 1 and info["truncated_response"] == 1
    assert cut.truncated
    # Left truncation keeps the head the template writes before the first user text
    # (here '<|im_start|>user\n') and the newest prompt tokens (the generation prompt at the end).
    head = tuple(tiny_tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    assert cut.prompt_ids == head + full.prompt_ids[-(16 - len(head)):]
    assert full.prompt_ids[: len(head)] == head
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == 40
    assert cut.chosen_ids == full.chosen_ids[:24]
    assert tiny_tokenizer.eos_token_id not in cut.chosen_ids  # cut responses lose EOS
    # The rejected response was short enough to keep whole, EOS included.
    assert cut.rejected_ids == full.rejected_ids


def test_pair_with_empty_response_after_tokenisation_is_dropped_and_counted(tiny_tokenizer):
    good = make_pair(row=1)
    empty = make_pair(row=7, rejected="")  # data.py rejects this earlier; collate must not rely on it
    tokenized, stats = tokenize_pairs([good, empty], tiny_tokenizer, 128, 64, progress=False)
    assert [t.row for t in tokenized] == [1]
    assert stats.kept == 1
    assert stats.dropped_rows == [7]


def test_collate_pads_sides_separately_and_concat_pads_together(tiny_tokenizer):
    a, _ = tokenize_pair(make_pair(chosen="hello", rejected="the quick brown fox jumps over the lazy dog"), tiny_tokenizer, 256, 128)
    b, _ = tokenize_pair(make_pair(chosen="hello world hello world", rejected="no"), tiny_tokenizer, 256, 128)
    batch = collate_pairs([a, b], tiny_tokenizer.pad_token_id)
    chosen_len = max(len(a.prompt_ids) + len(a.chosen_ids), len(b.prompt_ids) + len(b.chosen_ids))
    rejected_len = max(len(a.prompt_ids) + len(a.rejected_ids), len(b.prompt_ids) + len(b.rejected_ids))
    assert batch.chosen.input_ids.shape == (2, chosen_len)
    assert batch.rejected.input_ids.shape == (2, rejected_len)
    assert chosen_len != rejected_len
    # Padding is masked out and never labelled.
    pad_positions = batch.chosen.attention_mask == 0
    assert (batch.chosen.labels[pad_positions] == IGNORE_INDEX).all()
    joint = concat_sides(batch, tiny_tokenizer.pad_token_id)
    assert joint.input_ids.shape == (4, max(chosen_len, rejected_len))
    assert joint.num_tokens == batch.chosen.num_tokens + batch.rejected.num_tokens
    assert torch.equal(joint.labels[2, :rejected_len], batch.rejected.labels[0])


def test_pad_to_multiple_rounds_width_and_keeps_labels(tiny_tokenizer):
    tokenized, _ = tokenize_pair(make_pair(), tiny_tokenizer, 256, 128)
    plain = collate_pairs([tokenized], tiny_tokenizer.pad_token_id)
    padded = collate_pairs([tokenized], tiny_tokenizer.pad_token_id, pad_to_multiple_of=32)
    assert padded.chosen.input_ids.shape[1] % 32 == 0
    assert padded.chosen.input_ids.shape[1] >= plain.chosen.input_ids.shape[1]
    width = plain.chosen.input_ids.shape[1]
    assert torch.equal(padded.chosen.labels[:, :width], plain.chosen.labels)
    assert (padded.chosen.labels[:, width:] == IGNORE_INDEX).all()
    assert padded.chosen.num_tokens == plain.chosen.num_tokens
