"""Shared fixtures: a seed, a tiny tokenizer with a chat template and tiny random Llama models.

Everything here is built in-process in milliseconds; nothing is downloaded.
"""

from __future__ import annotations

import random

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead.",
    "User: What is the capital of France? The capital of France is Paris.",
    "I can't help with that. Here is a safer alternative: talk to someone you trust.",
    "system user assistant hello world the quick brown fox jumps over the lazy dog 0123456789",
]


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    torch.manual_seed(0)


def build_tokenizer(chat_template: bool = True, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, EOS = ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>" if not chat_template else None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer(chat_template=True)


@pytest.fixture
def plain_tokenizer():
    return build_tokenizer(chat_template=False)


def build_tiny_llama(vocab_size: int = 400, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = False):
    """A 2-layer, 64-wide random Llama: big enough to have every layer type, small enough for ms steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=0,
    )
    return LlamaForCausalLM(config).float()


def random_tokenized_pairs(n: int, vocab_size: int, seed: int = 0, min_length: int = 3):
    """``n`` TokenizedPairs of random ids (prompt and each response ``min_length`` to 11 tokens, responses end in EOS=2)."""
    from qlora_orpo.collate import TokenizedPair

    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab_size, (k,), generator=g).tolist())

    pairs = []
    for i in range(n):
        p, c, r = (int(torch.randint(min_length, 12, (1,), generator=g)) for _ in range(3))
        pairs.append(TokenizedPair(ids(p), ids(c) + (2,), ids(r) + (2,), row=i + 1))
    return pairs
