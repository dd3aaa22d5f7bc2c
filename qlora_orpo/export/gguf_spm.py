"""SentencePiece tokenizers in GGUF (``tokenizer.ggml.model = llama``): Llama-2, Mistral v0.1-v0.3, Gemma, Phi-3.

llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm``) escapes spaces to ``▁``, optionally
prepends one (``add_space_prefix``, also after every special token), starts from single
characters and repeatedly merges the adjacent pair whose concatenation is a token with the
highest *score*; a character that is no token is written as its ``<0xNN>`` byte tokens. So the
file needs every token's text, score and type (normal, unknown, control, user-defined, unused,
byte), the byte-fallback tokens, ``add_space_prefix`` and the special ids, as the converter's
``_set_vocab_sentencepiece`` writes them from ``tokenizer.model``.

We have the transformers tokenizer (``tokenizer.json``), not necessarily ``tokenizer.model``.
The converter's fallback for that case, ``_set_vocab_llama_hf`` (``gguf.LlamaHfVocab``), writes
the score -1000 for every token, which leaves llama.cpp merging left to right by position
instead of by the tokenizer's merge order. Here a token's score is minus the rank of the first
merge in ``tokenizer.json`` that produces it: a tokenizer.json converted from SentencePiece
lists its merges by the merged piece's score (transformers' ``generate_merges``), so the order,
all llama.cpp uses, is the original one. Byte, control and unknown tokens score 0 and
user-defined ones -1000, as in the converter.

Refused in one line, since llama.cpp would tokenise them differently: a Unigram model (its
``llama`` tokenizer merges by score; Unigram needs Viterbi), a BPE without byte fallback and all
256 ``<0xNN>`` tokens (llama.cpp has no ``<unk>`` fallback and would fail on an unknown
character), and a ``Metaspace`` pre-tokenizer that splits at spaces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .gguf_vocab import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    Vocab,
    VocabError,
    build_vocab,
    end_of_turn_token,
    write_special_tokens,
    write_vocab,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

UNKNOWN, BYTE = 2, 6  # gguf.TokenType values not in gguf_vocab
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class SpmVocab(Vocab):
    """:class:`Vocab` plus what a SentencePiece vocabulary adds; ``merges`` stays empty (llama.cpp uses scores)."""

    scores: list[float] = field(default_factory=list)
    add_space_prefix: bool = True
    space_scheme: str = "prepend"  # how tokenizer.json adds the leading ▁: see space_handling


def is_sentencepiece(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer.json ``spec`` is SentencePiece-style (``▁`` for spaces) rather than byte-level BPE."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "Unigram" or model.get("byte_fallback"):
        return True
    return decoder.get("type") != "ByteLevel" and SPACE in json.dumps(spec.get("normalizer")) + json.dumps(
        spec.get("pre_tokenizer")) + json.dumps(decoder, ensure_ascii=False)


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def space_handling(spec: dict[str, Any]) -> tuple[bool, str]:
    """``(add_space_prefix, scheme)`` of a SentencePiece tokenizer.json; :class:`VocabError` if spaces are not ``▁``.

    llama.cpp prepends a space to every run of text that starts the input or follows a special
    token, whether or not it already starts with one. The schemes of tokenizer.json:

    * ``prepend``: the older conversions (``legacy=True``) prepend ``▁`` in the normaliser, to
      every run of text between special tokens: exactly llama.cpp with ``add_space_prefix``.
    * ``never`` (Gemma): spaces replaced, nothing prepended: exactly llama.cpp without it.
    * ``first`` (a ``Metaspace`` pre-tokenizer, transformers' default ``legacy=False``): ``▁`` only
      before the text at offset 0, and only if it does not start with a space. No llama.cpp
      setting is identical; ``add_space_prefix = false`` reproduces every run after a special
      token, hence every chat-templated conversation that opens with a special token (BOS,
      ``[INST]``), which is the text training saw; a prompt that opens with plain text gets no
      leading ``▁`` in llama.cpp.
    * ``always`` (``Metaspace``, ``legacy=True``): ``▁`` before every run unless it starts with
      a space; written as ``add_space_prefix = true``, which differs on runs that start with a space.
    """
    normalizers, pres = _parts(spec.get("normalizer"), "normalizers"), _parts(spec.get("pre_tokenizer"), "pretokenizers")
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
    replace = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "
                  and n.get("content") == SPACE for n in normalizers)
    for p in pres:
        if replace and p.get("type") == "Split" and (p.get("pattern") or {}).get("String") == " ":
            continue  # transformers' GemmaTokenizer: splits at spaces the normaliser already replaced, a no-op
        if p.get("type") != "Metaspace":
            raise VocabError(f"tokenizer: SentencePiece pre-tokenizer {p.get('type')} has no llama.cpp equivalent")
        if p.get("split", False):
            raise VocabError("tokenizer: a Metaspace pre-tokenizer with split=true has no llama.cpp equivalent")
        replace = True
        scheme = p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
        return prepend or scheme == "always", "prepend" if prepend else scheme
    if not replace:
        raise VocabError("tokenizer: SentencePiece-style tokenizer that does not write spaces as '\u2581'")
    return prepend, "prepend" if prepend else "never"


def merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """Per merged token, minus the rank of the first merge that yields it (see the module docstring)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def build_spm_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> SpmVocab:
    """The GGUF tokenizer metadata of a SentencePiece-style fast tokenizer for a model with ``vocab_size`` rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"tokenizer: SentencePiece {model.get('type')} models are not supported by the GGUF "
                         "export (llama.cpp's llama tokenizer merges by score like BPE)")
    vocab = tokenizer.get_vocab()
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if not model.get("byte_fallback") or missing:
        raise VocabError("tokenizer: SentencePiece BPE without byte fallback (all 256 <0xNN> tokens) is not "
                         f"supported by the GGUF export ({len(missing)} byte tokens missing)")
    add_space_prefix, scheme = space_handling(spec)
    if max(vocab.values()) >= vocab_size:
        raise VocabError(f"tokenizer: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    ranked = merge_scores(model)
    floor = -float(len(ranked) + 1)  # a normal token no merge yields (single characters): never a bigram
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types, scores = [UNUSED] * vocab_size, [-10000.0] * vocab_size
    for token, token_id in vocab.items():
        byte = BYTE_TOKEN.fullmatch(token) is not None
        tokens[token_id], types[token_id] = token, BYTE if byte else NORMAL
        scores[token_id] = 0.0 if byte else ranked.get(token, floor)
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]], scores[vocab[unk]] = UNKNOWN, 0.0
    for token_id, added in tokenizer.added_tokens_decoder.items():  # as _create_vocab_sentencepiece
        if added.special:
            types[token_id], scores[token_id] = CONTROL, 0.0
        else:  # llama.cpp matches user-defined tokens in the raw text, before spaces become ▁
            tokens[token_id] = added.content.replace(SPACE, " ")
            types[token_id], scores[token_id] = USER_DEFINED, -1000.0
    plain = build_vocab_specials(tokenizer)
    return SpmVocab(pre="default", tokens=tokens, token_types=types, merges=[], scores=scores,
                    add_space_prefix=add_space_prefix, space_scheme=scheme, **plain)


def build_vocab_specials(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Special ids, BOS/EOS flags, chat template and end-of-turn token, as :func:`.gguf_vocab.build_vocab` finds them."""
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special = {name: int(i) for name, i in special.items() if i is not None}
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        special["eot"] = tokenizer.convert_tokens_to_ids(eot)
    with_special = list(tokenizer("a")["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    add_bos = "bos" in special and with_special[:1] == [special["bos"]] and without[:1] != [special["bos"]]
    add_eos = "eos" in special and with_special[-1:] == [special["eos"]] and without[-1:] != [special["eos"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: llama.cpp reads the default one
        template = template.get("default")
    return {"special_ids": special, "add_bos": add_bos, "add_eos": add_eos, "chat_template": template,
            "end_of_turn": eot}


def build_any_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocab:
    """SentencePiece-style tokenizers through :func:`build_spm_vocab`, byte-level BPE through ``build_vocab``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and is_sentencepiece(json.loads(backend.to_str())):
        return build_spm_vocab(tokenizer, vocab_size)
    return build_vocab(tokenizer, vocab_size)


def write_any_vocab(writer: Any, vocab: Vocab) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter``: the SentencePiece keys for :class:`SpmVocab`, else ``write_vocab``."""
    if not isinstance(vocab, SpmVocab):
        write_vocab(writer, vocab)
        return
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    write_special_tokens(writer, vocab)
