"""Text to token ids: the chat template, its end-of-turn tokens, and truncation of long prompts.

Rules (each tested in ``tests/test_templating.py`` and, per model family, ``tests/test_families.py``):

* The prompt is rendered with the tokenizer's chat template and the generation prompt
  (``add_generation_prompt=True``); without a template, as plain text (a single user
  message as is; a conversation as ``User: …``/``Assistant: …`` turns ending in ``Assistant:``).
* A reply is rendered by the template too (prompt + assistant turn): its text is taken as
  the template writes it (some templates ``trim`` it), followed by the tokens the template
  closes an assistant turn with, up to and including the last special token there:
  ``<|im_end|>`` (ChatML), ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma), ``<|end|>``
  (Phi-3), ``</s>`` (Mistral). A model trained so learns to end its turn the way its chat
  template (and so every chat front-end) expects. Without a template, or when the template
  writes no special token after a reply, the reply ends with EOS.
* Chosen and rejected share one tokenisation of the prompt. Labels cover the reply tokens
  (text and closing tokens), never the prompt.
* A template that refuses a system turn (Gemma's ``System role not supported``) gets the
  system text folded into the first user turn; the count is reported once per run. Any
  other template error is a :class:`DataError` naming the file, row and field.
* Truncation: a prompt longer than ``max_prompt_length`` keeps its head (BOS, the system
  turn and the first user header, as the template renders them) and loses the oldest
  tokens after it; then each reply is cut to fit ``max_length`` (a cut reply keeps no
  closing token, since it did not end there). A pair whose chosen or rejected reply keeps
  no text token is dropped and counted, never trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..core.errors import DataError
from .collate import TokenizedPair

if TYPE_CHECKING:
    from .preferences import Message, PreferencePair

_PLAIN_ROLE = {"user": "User", "assistant": "Assistant", "system": "System"}
# Stands in for message text while probing what a template writes around it. No template
# rewrites it (no whitespace to trim, no markup).
_SENTINEL = "QLORAORPOSENTINEL"


@dataclass
class TokenizeStats:
    """What tokenisation kept, cut, folded and dropped, for the dry run and the run log."""

    kept: int = 0
    dropped_rows: list[int] = field(default_factory=list)
    truncated_prompt: int = 0
    truncated_response: int = 0
    system_folded: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    sequence_lengths: list[int] = field(default_factory=list)  # prompt + longer response, before truncation

    @property
    def truncated(self) -> int:
        return self.truncated_prompt + self.truncated_response


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def special_token_ids(tokenizer) -> set[int]:
    """Every id the tokenizer treats as special: BOS/EOS/PAD and added special tokens (``<|eot_id|>``…)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _template_error_type():
    from jinja2.exceptions import TemplateError

    return TemplateError


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat template does around a reply, probed once per tokenizer.

    ``reply_tail`` is the text the template writes after an assistant reply (``""`` without
    a template); ``end_ids`` the token ids that close a trained reply; ``folds_system`` is
    True when the template refuses a system turn.
    """

    templated: bool
    reply_tail: str
    end_ids: tuple[int, ...]
    folds_system: bool

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, so replies cannot be terminated")
        if not has_chat_template(tokenizer):
            return cls(False, "", (tokenizer.eos_token_id,), False)
        template_error = _template_error_type()
        user = {"role": "user", "content": "hi"}
        try:
            _apply(tokenizer, [{"role": "system", "content": "sys"}, user], False)
            folds_system = False
        except template_error:
            folds_system = True
        rendered = _apply(tokenizer, [user, {"role": "assistant", "content": _SENTINEL}], False)
        tail = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in rendered else ""
        tail_ids = _encode(tokenizer, tail)
        special = special_token_ids(tokenizer)
        last_special = max((i for i, t in enumerate(tail_ids) if t in special), default=None)
        end_ids = tuple(tail_ids[: last_special + 1]) if last_special is not None else (tokenizer.eos_token_id,)
        return cls(True, tail, end_ids, folds_system)


def _apply(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)


def fold_system(messages: Sequence[Message]) -> list[Message]:
    """Move system turns into the first user turn (``system text\\n\\nuser text``), for templates without a system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def _template_messages(messages: Sequence[Message], fmt: ChatFormat) -> list[Message]:
    if fmt.folds_system and any(m["role"] == "system" for m in messages):
        return fold_system(messages)
    return list(messages)


def render_prompt(tokenizer, messages: Sequence[Message], fmt: ChatFormat | None = None) -> str:
    """The prompt text that precedes the reply, ending where the assistant starts speaking."""
    fmt = fmt or ChatFormat.of(tokenizer)
    if fmt.templated:
        return _apply(tokenizer, _template_messages(messages, fmt), True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{_PLAIN_ROLE.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def render_conversation(tokenizer, messages: Sequence[Message], reply: str, fmt: ChatFormat | None = None) -> str:
    """The prompt and an assistant ``reply`` as one text, as the template writes it (a system turn
    folded where the template refuses one); without a template, the plain prompt, a space, the reply."""
    fmt = fmt or ChatFormat.of(tokenizer)
    if fmt.templated:
        return _apply(tokenizer, [*_template_messages(messages, fmt), {"role": "assistant", "content": reply}], False)
    return render_prompt(tokenizer, messages, fmt) + " " + reply


def stop_token_ids(tokenizer, fmt: ChatFormat | None = None) -> list[int]:
    """Ids that end generation: the template's end-of-turn special tokens, then EOS."""
    fmt = fmt or ChatFormat.of(tokenizer)
    special = special_token_ids(tokenizer)
    ids = [t for t in fmt.end_ids if t in special]
    return list(dict.fromkeys([*ids, tokenizer.eos_token_id]))


def encode_prompt(tokenizer, messages: Sequence[Message], fmt: ChatFormat | None = None) -> list[int]:
    """Token ids of :func:`render_prompt` (a chat template writes its own BOS; plain turns get the tokenizer's)."""
    fmt = fmt or ChatFormat.of(tokenizer)
    return list(_encode(tokenizer, render_prompt(tokenizer, messages, fmt), add_special_tokens=not fmt.templated))


def generation_config(tokenizer, max_new_tokens: int, fmt: ChatFormat | None = None, **sampling: Any):
    """A ``GenerationConfig`` that stops at the template's end-of-turn tokens or EOS.

    A chat model ends its turn with the former (<|eot_id|>, <end_of_turn>, <|im_end|>...),
    which is often not the tokenizer's EOS. Padding falls back to EOS when there is no pad token.
    ``sampling``: ``do_sample``, ``temperature``, ``top_p`` ... (greedy when absent).
    """
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, fmt),
                            pad_token_id=pad, use_cache=True, **{"do_sample": False, **sampling})


def _reply_text(tokenizer, messages: list[Message], prompt_text: str, reply: str, fmt: ChatFormat) -> str:
    """The reply as the template writes it (e.g. trimmed), without the closing text."""
    full = _apply(tokenizer, [*messages, {"role": "assistant", "content": reply}], False)
    if full.startswith(prompt_text) and full.endswith(fmt.reply_tail):
        return full[len(prompt_text) : len(full) - len(fmt.reply_tail)]
    return reply  # a template whose generation prompt differs from its assistant header


def _prompt_head_ids(tokenizer, messages: list[Message], prompt_text: str, fmt: ChatFormat) -> list[int]:
    """Tokens a truncated prompt keeps at its start: BOS, the system turn and the first user header."""
    if not fmt.templated:
        with_special, without = _encode(tokenizer, prompt_text, True), _encode(tokenizer, prompt_text)
        return with_special[: len(with_special) - len(without)] if with_special[-len(without) :] == without else []
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return []
    probe = [*messages[:first_user], {"role": "user", "content": _SENTINEL}]
    rendered = _apply(tokenizer, probe, False)
    head = rendered[: rendered.index(_SENTINEL)] if _SENTINEL in rendered else ""
    return _encode(tokenizer, head) if head and prompt_text.startswith(head) else []


def _reply_ids(tokenizer, prompt_text: str, prompt_ids: list[int], body: str, fmt: ChatFormat) -> tuple[
    list[int], list[int]
]:
    """``(text ids, text + closing ids)`` of one reply, as the chat template's whole text encodes them.

    A reply is encoded together with the prompt before it (and the closing text after it),
    and the prompt's tokens are taken off the front: a SentencePiece (Metaspace) tokenizer
    gives a separately encoded text a leading ``▁`` that the joint encoding, which inference
    sees, does not have (Mistral's ``[/INST]hello``), and merges a reply's last characters
    with the closing text's space (Llama-2's ``world </s>``). Byte-level BPE splits at these
    boundaries anyway, so there the two encodings agree. Where the prompt's last token merges
    with the reply's first, no cut reproduces the joint encoding and the reply is encoded on
    its own; so is a reply without a template (plain text gets EOS).
    """
    separate = _encode(tokenizer, body)
    if not fmt.templated:
        return separate, separate + list(fmt.end_ids)
    n = len(prompt_ids)
    joint = _encode(tokenizer, prompt_text + body)
    if joint[:n] != prompt_ids:
        return separate, separate + list(fmt.end_ids)
    text = joint[n:]
    special = special_token_ids(tokenizer)
    if not any(t in special for t in _encode(tokenizer, fmt.reply_tail)):
        return text, text + list(fmt.end_ids)  # the template closes with no special token: EOS (end_ids)
    closed = _encode(tokenizer, prompt_text + body + fmt.reply_tail)
    if closed[:n] != prompt_ids:
        return text, text + list(fmt.end_ids)
    closed = closed[n:]
    # The closing tokens end at the tail's last special token (ChatFormat.end_ids' rule).
    last = max(i for i, t in enumerate(closed) if t in special)
    return text, closed[: last + 1]


@contextlib.contextmanager
def _template_errors_name(pair: PreferencePair) -> Iterator[None]:
    """A chat-template error becomes a :class:`DataError` naming the pair's file, row and field."""
    try:
        yield
    except _template_error_type() as exc:
        raise DataError(pair.source, f"the chat template refused this prompt ({exc})", row=pair.row, field="prompt") from None


def tokenize_pair(
    pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int, fmt: ChatFormat | None = None
) -> tuple[TokenizedPair | None, dict[str, int]]:
    """Tokenise and truncate one pair. Returns ``(None, info)`` when it must be dropped.

    ``info`` holds the untruncated lengths, which parts were cut and whether the system
    turn was folded, for the statistics. A template error raises :class:`DataError`.
    """
    fmt = fmt or ChatFormat.of(tokenizer)
    messages = _template_messages(pair.prompt, fmt)
    with _template_errors_name(pair):
        prompt_text = render_prompt(tokenizer, messages, fmt)
        if fmt.templated:
            bodies = [_reply_text(tokenizer, messages, prompt_text, text, fmt) for text in (pair.chosen, pair.rejected)]
        else:
            separator = "" if len(messages) == 1 and messages[0]["role"] == "user" else " "
            bodies = [separator + text for text in (pair.chosen, pair.rejected)]
    # The chat template writes its own special tokens as text; plain text gets the
    # tokenizer's usual BOS (if it has one).
    prompt_ids = _encode(tokenizer, prompt_text, add_special_tokens=not fmt.templated)
    replies = [_reply_ids(tokenizer, prompt_text, prompt_ids, body, fmt) for body in bodies]
    info = {
        "prompt_length": len(prompt_ids),
        "sequence_length": len(prompt_ids) + max(len(closed) for _, closed in replies),
        "truncated_prompt": 0,
        "truncated_response": 0,
        "system_folded": int(fmt.folds_system and any(m["role"] == "system" for m in pair.prompt)),
    }
    if len(prompt_ids) > max_prompt_length:
        with _template_errors_name(pair):  # rendered only for the prompts that need cutting
            head_ids = _prompt_head_ids(tokenizer, messages, prompt_text, fmt)
        keep = max_prompt_length - len(head_ids)
        if keep > 0:
            prompt_ids = head_ids + prompt_ids[len(prompt_ids) - keep :]
        else:  # the head alone is too long: keep the newest tokens
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
        info["truncated_prompt"] = 1
    budget = max_length - len(prompt_ids)
    responses = []
    for text_ids, closed in replies:
        if len(closed) > budget:
            ids = text_ids[: max(budget, 0)]  # cut: no closing token, it did not end here
            info["truncated_response"] = 1
            text_tokens = len(ids)
        else:
            text_tokens = len(text_ids)
            ids = closed
        if text_tokens == 0:
            return None, info  # a reply with no text token left teaches nothing
        responses.append(ids)
    tokenized = TokenizedPair(
        prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(responses[0]),
        rejected_ids=tuple(responses[1]),
        row=pair.row,
        truncated=bool(info["truncated_prompt"] or info["truncated_response"]),
    )
    return tokenized, info


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    progress: bool = True,
    description: str = "tokenising",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise every pair; dropped pairs are counted in the stats, never returned."""
    fmt = ChatFormat.of(tokenizer)
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    for pair in tqdm(pairs, desc=description, disable=not progress or None, unit="pair", leave=False):
        tokenized, info = tokenize_pair(pair, tokenizer, max_length, max_prompt_length, fmt)
        stats.prompt_lengths.append(info["prompt_length"])
        stats.sequence_lengths.append(info["sequence_length"])
        stats.truncated_prompt += info["truncated_prompt"]
        stats.truncated_response += info["truncated_response"]
        stats.system_folded += info["system_folded"]
        if tokenized is None:
            stats.dropped_rows.append(pair.row)
            continue
        stats.kept += 1
        out.append(tokenized)
    return out, stats


def show_example(tokenizer, pair: TokenizedPair) -> str:
    """A tokenised pair as text, each reply's labelled (trained) span between ``[[`` and ``]]``."""

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prompt = text(pair.prompt_ids)
    return (
        f"--- row {pair.row}{' (truncated)' if pair.truncated else ''}: "
        f"{len(pair.prompt_ids)} prompt + {len(pair.chosen_ids)} chosen / {len(pair.rejected_ids)} rejected tokens\n"
        f"[chosen]\n{prompt}[[{text(pair.chosen_ids)}]]\n"
        f"[rejected]\n{prompt}[[{text(pair.rejected_ids)}]]"
    )
