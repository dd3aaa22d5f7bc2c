"""Shared fixtures: a seed, a tiny tokenizer with a chat template and tiny random Llama models.

The builders live in ``qlora_orpo.bench.tiny`` (the benchmark's ``--quick`` uses them too).

Everything here is built in-process in milliseconds; nothing is downloaded.
"""

from __future__ import annotations

import random

import pytest
import torch

from qlora_orpo.bench import tiny
from qlora_orpo.bench.tiny import build_tiny_llama  # noqa: F401  (tests import it from here)

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


@pytest.fixture(scope="session", autouse=True)
def session_eval_cache(tmp_path_factory):
    """Base-model evaluations cached under the session's tmp dir, never in the user's cache
    (evaluation/base_cache.py); module-scoped fixtures run before the per-test one below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_ORPO_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache-session")))
        yield


@pytest.fixture(autouse=True)
def private_eval_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of base-model evaluations: none reuses another's."""
    monkeypatch.setenv("QLORA_ORPO_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))


def build_tokenizer(chat_template: bool = True, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, EOS = ``<|im_end|>`` (qlora_orpo.bench.tiny)."""
    return tiny.build_tokenizer(CORPUS, vocab_size=vocab_size, chat_template=chat_template)


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer(chat_template=True)


@pytest.fixture
def plain_tokenizer():
    return build_tokenizer(chat_template=False)


def random_tokenized_pairs(n: int, vocab_size: int, seed: int = 0, min_length: int = 3):
    """``n`` TokenizedPairs of random ids (prompt and each response ``min_length`` to 11 tokens, responses end in EOS=2)."""
    from qlora_orpo.data.collate import TokenizedPair

    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab_size, (k,), generator=g).tolist())

    pairs = []
    for i in range(n):
        p, c, r = (int(torch.randint(min_length, 12, (1,), generator=g)) for _ in range(3))
        pairs.append(TokenizedPair(ids(p), ids(c) + (2,), ids(r) + (2,), row=i + 1))
    return pairs
