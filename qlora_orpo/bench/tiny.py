"""A tiny random Llama and a byte-level BPE tokenizer, built in about a second, nothing downloaded.

The one builder for ``bench_orpo.py --quick`` and for the test suite's fixtures (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..config import EMBEDDED

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 400, chat_template: bool = True):
    """A byte-level BPE tokenizer trained on ``corpus``: EOS ``<|im_end|>``, pad ``<|endoftext|>``.

    With ``chat_template`` it gets a ChatML template; without, ``<|endoftext|>`` is also its
    BOS (a plain tokenizer, as base models have).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>" if not chat_template else None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int = 400,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    tie: bool = False,
    max_positions: int = 512,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    bos_token_id: int | None = 0,
):
    """A random Llama (4 heads, 2 key/value heads, MLP twice ``hidden``) in float32, seeded.

    Every layer type of the real models, small enough for millisecond steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
    )
    return LlamaForCausalLM(config).float()


def build_tiny_model_dir(path: Path, data: str = EMBEDDED, vocab_size: int = 512, hidden: int = 64) -> Path:
    """A 2-layer random Llama and a chat tokenizer trained on a few rows of ``data``, saved to ``path``.

    For ``--quick`` runs: long positions (4096) so every benchmark length fits, tied embeddings
    as in SmolLM2.
    """
    from ..data.preferences import load_preferences

    pairs = load_preferences(data).pairs[:200]
    corpus = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, chat_template=True)
    model = build_tiny_llama(
        vocab_size=len(tokenizer), hidden=hidden, layers=2, seed=0, tie=True, max_positions=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_smollm2_shaped_dir(path: Path, data: str = EMBEDDED, vocab_size: int = 8192) -> Path:
    """A random model of SmolLM2-135M's shape (30 layers, 576 wide), saved to ``path``.

    For measuring speed and memory where the embedded model's package cannot be installed
    (a GPU machine without network): the same matmul shapes and layer count, a BPE
    tokenizer trained on the data (``vocab_size`` tokens; the embedding keeps 49,152 rows).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data.preferences import load_preferences

    pairs = load_preferences(data).pairs
    corpus = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size, chat_template=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
