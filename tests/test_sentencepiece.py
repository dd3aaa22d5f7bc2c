"""SentencePiece (Metaspace) tokenizers: a reply's tokens equal the chat template's joint encoding (issue 20).

Every other family test uses byte-level BPE, which splits at a reply's edges anyway. A
Metaspace tokenizer gives a separately encoded reply a leading ``▁`` (Mistral's
``[/INST]hello``) and merges its last characters with the closing space (Llama-2's
``world </s>``), so training would see token sequences inference never produces. Tiny
tokenizers are trained here in both of the ways Hugging Face ships them: a Metaspace
pre-tokenizer (``legacy=False``) and the older Prepend/Replace normaliser.
"""

from __future__ import annotations

import pytest
from conftest import CORPUS
from families import MISTRAL_TEMPLATE

from qlora_orpo.data.preferences import PreferencePair
from qlora_orpo.data.templating import ChatFormat, tokenize_pair

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]


def sentencepiece_tokenizer(template: str, legacy: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:  # LlamaTokenizerFast(legacy=True): '▁' prepended and spaces replaced by the normaliser
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        corpus = ["▁" + line.replace(" ", "▁") for line in CORPUS]
    else:  # legacy=False (Mistral, newer Llama-2 conversions): a Metaspace pre-tokenizer
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        corpus = CORPUS
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=sorted(set("".join(CORPUS)) | {"▁"}))
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


PAIRS = [
    PreferencePair(({"role": "user", "content": "the quick brown fox"},), "hello world", "lazy dog", 1, "x"),
    PreferencePair(({"role": "user", "content": "capital of France?"},), "Paris is the capital", "bread", 2, "x"),
    PreferencePair(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "flour and water"}), "bread dough", "the dog", 3, "x"),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy"])
@pytest.mark.parametrize("template", [MISTRAL_TEMPLATE, LLAMA2_TEMPLATE], ids=["mistral", "llama2"])
def test_reply_tokens_equal_the_joint_encoding_of_the_rendered_conversation(template, legacy):
    tokenizer = sentencepiece_tokenizer(template, legacy)
    fmt = ChatFormat.of(tokenizer)
    for pair in PAIRS:
        tokenized, _ = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=128, fmt=fmt)
        for reply, ids in ((pair.chosen, tokenized.chosen_ids), (pair.rejected, tokenized.rejected_ids)):
            text = tokenizer.apply_chat_template([*pair.prompt, {"role": "assistant", "content": reply}], tokenize=False)
            joint = tokenizer(text, add_special_tokens=False)["input_ids"]
            got = list(tokenized.prompt_ids) + list(ids)
            assert got == joint, (tokenizer.convert_ids_to_tokens(got), tokenizer.convert_ids_to_tokens(joint))
            assert ids[-1] == tokenizer.eos_token_id  # the reply still ends its turn


def test_a_cut_reply_keeps_no_closing_token():
    tokenizer = sentencepiece_tokenizer(LLAMA2_TEMPLATE, legacy=False)
    pair = PAIRS[1]
    full, _ = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=128)
    budget = len(full.prompt_ids) + 2
    cut, info = tokenize_pair(pair, tokenizer, max_length=budget, max_prompt_length=128)
    assert info["truncated_response"] == 1 and len(cut.chosen_ids) == 2
    assert tokenizer.eos_token_id not in cut.chosen_ids
    assert list(cut.chosen_ids) == list(full.chosen_ids[:2])
