"""``--chat-template NAME|FILE``: a chat format for a base model without one (or to replace its own).

Built-in templates (:data:`TEMPLATES`) for chatml, llama3, gemma, mistral, phi3 and zephyr,
shortened from the families' published ones, each declaring the token that ends an assistant
turn. A FILE is a jinja template; it may declare that token in a comment,
``{# end_of_turn: <|eot_id|> #}``, else it is found the way it is for a tokenizer's own
template (``templating.ChatFormat``: the last special token the template writes after a reply).

:func:`apply_chat_template` installs the template on a tokenizer and marks the declared tokens
(end of turn and turn markers) special where the vocabulary already has them as single tokens,
so that the labelled span and the generation stop tokens follow the template exactly as they
do for a tokenizer's own template. It never adds a token: a new row in the embedding matrix
would be untrained (and change the base's fingerprint), so a template whose end-of-turn token
the vocabulary lacks is refused, naming the token. The adapter saves the tokenizer with the
template (``export/adapters.py``), so chat, eval, export and the GGUF Modelfile use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError

EOS = "eos"  # a template whose turns end with the tokenizer's own EOS token (Mistral, Zephyr)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    text: str  # jinja, as transformers' apply_chat_template renders it
    end_of_turn: str | None  # the token that closes an assistant turn; EOS; None: found by probing
    markers: tuple[str, ...] = ()  # other tokens of the format, marked special when the vocabulary has them


_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "chatml",
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            "<|im_end|>", ("<|im_start|>",),
        ),
        ChatTemplate(
            "llama3",
            _BOS + "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
            " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
            "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"),
        ),
        ChatTemplate(  # no system role, as Gemma's own: templating folds a system turn into the first user turn
            "gemma",
            _BOS + "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
            "{% endif %}{% for message in messages %}"
            "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
            "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
            "<end_of_turn>", ("<start_of_turn>",),
        ),
        ChatTemplate(  # [INST] turns, the reply closed by EOS; no system role (folded)
            "mistral",
            _BOS + "{% for message in messages %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
            "{% endfor %}",
            EOS, ("[INST]", "[/INST]"),
        ),
        ChatTemplate(
            "phi3",
            "{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
            "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>"),
        ),
        ChatTemplate(
            "zephyr",
            "{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
            EOS, ("<|system|>", "<|user|>", "<|assistant|>"),
        ),
    )
}
_DECLARED = re.compile(r"\{#-?\s*end_of_turn:\s*(\S+?)\s*-?#\}")


def resolve_chat_template(value: str) -> ChatTemplate:
    """A built-in template by name, or a jinja file (its ``{# end_of_turn: TOKEN #}`` comment read)."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat_template: {value!r} is neither a built-in template ({', '.join(TEMPLATES)}) "
                          "nor a jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"chat_template: {path}: cannot read it ({exc})") from None
    if "messages" not in text:
        raise ConfigError(f"chat_template: {path}: not a chat template (it never reads 'messages')")
    declared = _DECLARED.search(text)
    return ChatTemplate(str(path), text, declared.group(1) if declared else None)


def apply_chat_template(tokenizer, value: str, model: str = "the model") -> ChatTemplate | None:
    """Install the template ``value`` names on ``tokenizer`` (in place); None and no change for ``""``.

    Raises :class:`ConfigError` naming the template and the token when the declared end-of-turn
    token is not one token of ``tokenizer``'s vocabulary (``model`` names whose tokenizer it is).
    """
    if not value:
        return None
    template = resolve_chat_template(value)
    vocab = tokenizer.get_vocab()
    end = tokenizer.eos_token if template.end_of_turn == EOS else template.end_of_turn
    if end is not None and end not in vocab:
        raise ConfigError(
            f"chat_template: {template.name} ends a reply with {end!r}, which the tokenizer of {model} does not "
            f"have as one token; choose a template whose tokens it has, or give a jinja file"
        )
    # Special, so that ChatFormat labels up to the token, generation stops at it and decoding with
    # skip_special_tokens hides it. Only tokens already in the vocabulary: the model's size stays.
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    marked = [t for t in (end, *template.markers) if t and t in vocab and t not in special]
    if marked:
        size = len(tokenizer)
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in marked], special_tokens=True)
        assert len(tokenizer) == size, "marking existing tokens special must not grow the vocabulary"
    tokenizer.chat_template = template.text
    return template
