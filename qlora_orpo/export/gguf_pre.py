"""llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (``tokenizer.ggml.pre``), found its way.

llama.cpp does not read the regexes of ``tokenizer.json``: it has one hard-coded pre-tokenizer
per name and refuses a name it does not know (``unknown pre-tokenizer type: 'gpt2'``). Its
converter (``convert_hf_to_gguf.py``, ``get_vocab_base_pre``) names a tokenizer by encoding a
fixed check text that exercises whitespace runs, digits, emoji, scripts and apostrophes, and
looking up the sha256 of ``str(ids)`` in a table generated from the real models. A real
tokenizer is therefore named here by the same hash; only a tokenizer that is in no such table
(the tiny ones tests train) falls back to reading its ``pre_tokenizer`` spec
(:func:`qlora_orpo.export.gguf_vocab.pre_tokenizer_name`).
"""

from __future__ import annotations

from hashlib import sha256
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# llama.cpp's check text, character for character (the hashes below depend on every one of them).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's name, for the tokenizers of the
# families this exporter writes (llama/mistral/qwen2 graphs with a byte-level BPE vocabulary).
# From llama.cpp's convert_hf_to_gguf.py (generated there by convert_hf_to_gguf_update.py).
KNOWN_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2 (embedded)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 tokenizer
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3 (llama graph)
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}


def check_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's ``chkhsh`` of ``tokenizer``: sha256 of ``str(ids)`` of :data:`CHECK_TEXT`, special tokens included.

    ``encode`` with its default ``add_special_tokens=True``, as the converter calls it: a BOS
    the tokenizer adds is part of what the table's hashes were taken over.
    """
    return sha256(str(list(tokenizer.encode(CHECK_TEXT))).encode()).hexdigest()


def pre_name_by_hash(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """llama.cpp's pre-tokenizer name for ``tokenizer`` from :data:`KNOWN_HASHES`, None when its hash is not there."""
    return KNOWN_HASHES.get(check_hash(tokenizer))
