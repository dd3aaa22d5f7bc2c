"""Tokenizer metadata for a GGUF file, the end-of-turn token and the Ollama ``Modelfile``.

llama.cpp does not read ``tokenizer.json``; it rebuilds the tokenizer from GGUF metadata:
``tokenizer.ggml.model`` (``gpt2`` is byte-level BPE), ``tokenizer.ggml.pre`` (which regex
splits the text before BPE; llama.cpp knows each by name), the tokens in their byte-level
spelling, one type per token (normal, control = special, user-defined = added but not
special, unused = padding rows), the merges, the special ids and the chat template. Only
byte-level BPE tokenizers whose pre-tokenizer we can name are written; anything else is
refused rather than written with a guess that llama.cpp would tokenise differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.errors import UserError
from ..data.templating import ChatFormat, special_token_ids
from .gguf_pre import pre_name_by_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MODELFILE_HEADER = "# Ollama Modelfile written by qlora_orpo"
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values
# tokenizer.json Split regexes of the byte-level families llama.cpp knows by name.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
PRE_NAMES = ("gpt-2", "smollm", *SPLIT_NAMES.values())  # as llama.cpp spells them (never "gpt2")
# Placeholders rendered through the chat template to find its pieces; unlikely in any template.
_PLACEHOLDER = {"system": "SYS-7f3a", "user": "USR-7f3a", "assistant": "AST-7f3a", "user2": "USR2-7f3a"}


class VocabError(UserError):
    """The tokenizer cannot be described in GGUF metadata that llama.cpp reads the same way."""


@dataclass
class Vocab:
    """Everything ``tokenizer.*`` in the GGUF holds; lists are indexed by token id (``vocab_size`` long)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    end_of_turn: str | None = None


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizer.json ``pre_tokenizer``; :class:`VocabError` if none fits.

    The fallback of :func:`build_vocab` for tokenizers whose check hash llama.cpp's table does
    not hold (:mod:`qlora_orpo.export.gguf_pre`): tiny trained ones, mostly.
    """

    def byte_level(p: dict[str, Any], regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex
                and not p.get("add_prefix_space", False))

    if pre is not None and byte_level(pre, True):
        return "gpt-2"
    parts = (pre or {}).get("pretokenizers") or []
    if (pre or {}).get("type") == "Sequence" and len(parts) == 2:
        first, second = parts
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
            return "smollm"  # GPT-2 regex after splitting every digit apart
        regex = (first.get("pattern") or {}).get("Regex")
        if (first.get("type") == "Split" and regex in SPLIT_NAMES and not first.get("invert")
                and str(first.get("behavior")).lower() == "isolated" and byte_level(second, False)):
            return SPLIT_NAMES[regex]
    summary = json.dumps(pre, sort_keys=True)[:120]
    raise VocabError(f"tokenizer: pre-tokenizer {summary} has no known llama.cpp name; supported: {', '.join(PRE_NAMES)}")


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token that closes an assistant turn in the chat template (``<|im_end|>``, ``<|eot_id|>``).

    The first special token of the closing tokens training labels (``templating.ChatFormat``);
    None without a chat template, when the template fails, or when no special token follows a reply.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        fmt = ChatFormat.of(tokenizer)
    except Exception:  # noqa: BLE001 - a template may raise anything (jinja, its own raise_exception)
        return None
    special = special_token_ids(tokenizer)
    first = next((t for t in fmt.end_ids if t in special), None) if fmt.reply_tail else None
    return tokenizer.convert_ids_to_tokens(first) if first is not None else None


def build_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocab:
    """The GGUF tokenizer metadata of a fast byte-level BPE tokenizer for a model with ``vocab_size`` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(f"tokenizer: {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise VocabError(f"tokenizer: only byte-level BPE (gpt2 style) is supported, got model "
                         f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}")
    # llama.cpp's own way first (the hash of a check text's ids), the spec's regexes for the rest.
    pre = pre_name_by_hash(tokenizer) or pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise VocabError(f"tokenizer: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows no token uses, as llama.cpp names them
    types = [UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id], types[token_id] = token, NORMAL
    for token_id, added in tokenizer.added_tokens_decoder.items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special = {name: int(i) for name, i in special.items() if i is not None}
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        special["eot"] = tokenizer.convert_tokens_to_ids(eot)
    probe = "a"
    with_special = list(tokenizer(probe)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    add_bos = "bos" in special and with_special[:1] == [special["bos"]] and without[:1] != [special["bos"]]
    add_eos = "eos" in special and with_special[-1:] == [special["eos"]] and without[-1:] != [special["eos"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: llama.cpp reads the default one
        template = template.get("default")
    return Vocab(pre=pre, tokens=tokens, token_types=types, merges=merges, special_ids=special,
                 add_bos=add_bos, add_eos=add_eos, chat_template=template, end_of_turn=eot)


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter`` under llama.cpp's keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    write_special_tokens(writer, vocab)


def write_special_tokens(writer: Any, vocab: Any) -> None:
    """The keys every tokenizer model shares: special token ids, BOS/EOS adding, the chat template."""
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[tuple[str, str]], generation: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, placeholder: str) -> tuple[str, str]:
    """``text`` around the single occurrence of ``placeholder``; ValueError otherwise."""
    if text.count(placeholder) != 1:
        raise ValueError(placeholder)
    before, after = text.split(placeholder)
    return before, after


def chat_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """The chat template as fixed text around each message, or None when it is not that simple.

    Renders placeholder conversations and cuts the text around them: ``start`` (before the
    first message), per role the text before and after its content, ``generation`` (the
    assistant prompt) and ``default_system`` (a system turn the template adds when none is
    given, as SmolLM2's does). The pieces are accepted only if they reproduce the template's
    own rendering of a system/user/assistant/user conversation exactly.
    """
    p = _PLACEHOLDER
    try:
        one = _render(tokenizer, [("user", p["user"])], False)
        two = _render(tokenizer, [("user", p["user"]), ("assistant", p["assistant"])], False)
        three = _render(tokenizer, [("user", p["user"]), ("assistant", p["assistant"]), ("user", p["user2"])], False)
        prompt = _render(tokenizer, [("user", p["user"])], True)
        with_system = _render(tokenizer, [("system", p["system"]), ("user", p["user"])], False)
        full = _render(tokenizer, [("system", p["system"]), ("user", p["user"]), ("assistant", p["assistant"]),
                                   ("user", p["user2"])], True)
        if not (two.startswith(one) and three.startswith(two) and prompt.startswith(one)):
            return None
        wrap = {"user": _split(three[len(two):], p["user2"]), "assistant": _split(two[len(one):], p["assistant"])}
        user_part = wrap["user"][0] + p["user"] + wrap["user"][1]
        if not (one.endswith(user_part) and with_system.endswith(user_part)):
            return None
        start = one[: len(one) - len(user_part)]
        head, tail = _split(with_system[: -len(user_part)], p["system"])
        # Where the fixed start ends and the system wrapper begins is ambiguous when the template
        # adds a default system turn (SmolLM2): prefer a split with no default, else the longest wrapper.
        splits = []
        for i in range(len(head) + 1):
            before, default = head[i:], start[i:]
            if not start.startswith(head[:i]):
                continue
            if not default:
                splits.insert(0, (i, None))
            elif default.startswith(before) and default.endswith(tail) and len(default) > len(before + tail):
                splits.append((i, default[len(before): len(default) - len(tail)]))
        if not splits:
            return None
        cut, default_system = splits[0]
        wrap["system"] = (head[cut:], tail)
        pieces = {"start": head[:cut], "generation": prompt[len(one):], "default_system": default_system}
        pieces["wrap"] = wrap
    except Exception:  # noqa: BLE001 - templates that raise (no system role, strict alternation) fall back
        return None
    order = [("system", p["system"]), ("user", p["user"]), ("assistant", p["assistant"]), ("user", p["user2"])]
    if render_with_pieces(pieces, order) != full or render_with_pieces(pieces, [("user", p["user"])]) != prompt:
        return None
    return pieces


def render_with_pieces(pieces: dict[str, Any], turns: list[tuple[str, str]]) -> str:
    """What the Modelfile's Go template produces for ``turns`` (the generation prompt appended)."""
    text = pieces["start"]
    if pieces["default_system"] is not None and turns[0][0] != "system":
        turns = [("system", pieces["default_system"]), *turns]
    for role, content in turns:
        before, after = pieces["wrap"][role]
        text += before + content + after
    return text + pieces["generation"]


def go_template(pieces: dict[str, Any]) -> str:
    """An Ollama (Go text/template) TEMPLATE from :func:`chat_pieces`; no ``{{-`` so that newlines stay."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
        for i, (role, (before, after)) in enumerate(pieces["wrap"].items())
    )
    return f"{pieces['start']}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{pieces['generation']}"


def render_modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None,
                     system: str | None = None, add_bos: bool = False) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE (when derivable), SYSTEM default, stop tokens.

    ``system``: the run's ``--system-prompt``, which replaces the template's own default system message.
    ``add_bos``: the GGUF's ``tokenizer.ggml.add_bos_token``. Ollama tokenises the rendered
    TEMPLATE with the model's special tokens added, so a template that writes BOS itself
    (Llama 3's ``{{ bos_token }}``) would reach the model with two; the literal BOS is cut from
    the TEMPLATE then, and the file's flag supplies the one BOS.

    The stop tokens are the end-of-turn token and EOS: llama.cpp stops at EOS, but a chat
    template closes each turn with its own token, which Ollama must be told about.
    """
    stops = list(dict.fromkeys(t for t in (end_of_turn, tokenizer.eos_token) if t))
    lines = [MODELFILE_HEADER, "# Create the model with: ollama create <name> -f Modelfile", f"FROM ./{gguf_name}"]
    pieces = chat_pieces(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    bos = tokenizer.bos_token
    if pieces and add_bos and bos and pieces["start"].startswith(bos):
        pieces = {**pieces, "start": pieces["start"][len(bos):]}
    template = go_template(pieces) if pieces else None
    if template and '"""' not in template and "{{" not in "".join(v for w in pieces["wrap"].values() for v in w):
        lines.append(f'TEMPLATE """{template}"""')
        default = system or pieces["default_system"]
        if default is not None and '"""' not in default:
            lines.append(f'SYSTEM """{default}"""')
    else:
        lines.append("# The chat template is not plain text around each message; no TEMPLATE could be derived.")
        lines.append("# The GGUF holds the jinja template (tokenizer.chat_template) for llama.cpp.")
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    return "\n".join(lines) + "\n"
