"""Preference data: every supported source and row shape in, one list of :class:`PreferencePair` out.

Sources (picked by what ``data`` names):

* ``"embedded"``: the packaged Anthropic HH harmless-base test split (:data:`EMBEDDED_DATA`);
* a file, by suffix: ``.jsonl``, ``.json`` (a list of rows, or ``{"data": [...]}``), ``.csv`` (each of
  the three optionally ``.gz``) or ``.parquet``;
* a directory written by ``datasets.save_to_disk`` (a ``DatasetDict`` gives up ``split``), or any other
  directory ``datasets.load_dataset`` understands;
* a dataset name that ``datasets.load_dataset(name, split=split)`` resolves from local files or the
  datasets cache. The hub is never contacted: offline, each attempt would otherwise spend ~20 s retrying.

Row shapes (detected once per source, from the first row that has both response columns):

* ``prompt/chosen/rejected``: three strings;
* ``conversational``: the prompt and/or responses are lists of ``{"role", "content"}`` messages. Without
  a prompt, the prompt is the message prefix chosen and rejected share; a chosen list that repeats the
  prompt has it stripped. Whatever follows the prompt must be exactly one assistant message;
* ``anthropic-hh``: no prompt, chosen and rejected are ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``
  transcripts, split after the last ``"\\n\\nAssistant:"`` both share.

Row numbers are 1-based and mean: JSONL, the physical line (blank lines are skipped but counted, so the
number matches an editor's); JSON, Parquet and ``datasets``, the index in the list or table + 1; CSV,
the data record + 1, the header not counted (a record with quoted newlines spans several lines).

A row that cannot become a pair is a :class:`SkippedRow` whose reason starts with a short category
("missing field", "empty response", ...) that :meth:`PreferenceData.skip_reasons` counts; with
``strict=True`` the first one raises :class:`DataError` instead. Responses are returned stripped of
surrounding whitespace in every shape, so that "empty" means the same everywhere.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from .sources import RowProblem as _RowProblem
from .sources import read_rows

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}

SHAPES = ("prompt/chosen/rejected", "conversational", "anthropic-hh")
ROLES = ("user", "assistant", "system")
EMBEDDED = "embedded"
EMBEDDED_DATA = Path(__file__).resolve().parents[1] / "resources" / "hh-rlhf-harmless-base-test.jsonl.gz"

_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")

HOLDOUT_SALT = "qlora_orpo-holdout-v1"
_HOLDOUT_BUCKETS = 10_000


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # the conversation before the response, oldest first
    chosen: str  # preferred assistant response (text only)
    rejected: str  # dispreferred assistant response
    row: int  # 1-based row number in the source (see the module docstring)
    source: str  # file path or dataset name it came from


@dataclass(frozen=True)
class SkippedRow:
    row: int
    field: str | None  # the user's column name, or None when the whole row is unusable
    reason: str  # "<category>" or "<category>: <detail>"
    source: str = ""  # set when the data has several sources, so that a row number names its file

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]

    def describe(self) -> str:
        where = f"row {self.row}" if self.field is None else f"row {self.row}, field '{self.field}'"
        return f"{self.source + ', ' if self.source else ''}{where}: {self.reason}"


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    skipped: list[SkippedRow]
    shape: str  # one of SHAPES
    source: str
    total_rows: int

    def skip_reasons(self) -> dict[str, int]:
        """Skip category -> number of rows, most common first."""
        return dict(Counter(s.category for s in self.skipped).most_common())

    def describe_skipped(self, limit: int = 5) -> list[str]:
        """The first ``limit`` skipped rows as ``"row N, field 'x': reason"``."""
        return [s.describe() for s in self.skipped[:limit]]


@dataclass(frozen=True)
class _Columns:
    prompt: str
    chosen: str
    rejected: str


# --- public entry points ------------------------------------------------------------------------


def resolve_data_path(data: str) -> str:
    """``"embedded"`` -> the packaged HH file; anything else is returned unchanged."""
    return str(EMBEDDED_DATA) if data == EMBEDDED else data


def load_preferences(
    data: str,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
    strict: bool = False,
    max_rows: int = 0,
) -> PreferenceData:
    """Read every row of ``data`` (the first ``max_rows``, if set) into preference pairs; bad rows
    are skipped (or fatal if ``strict``).

    Raises :class:`DataError` when the source cannot be found or read at all, when ``strict`` and a
    row is bad, and when no row survives.
    """
    source = resolve_data_path(str(data))  # str(): a Path works too
    columns = _Columns(prompt_field, chosen_field, rejected_field)
    pairs: list[PreferencePair] = []
    skipped: list[SkippedRow] = []
    shape: str | None = None
    total = 0
    for number, row in read_rows(source, split):
        if max_rows and total >= max_rows:
            break
        total += 1
        try:
            if isinstance(row, _RowProblem):  # the reader could not even parse this row
                raise row
            if not isinstance(row, dict):
                raise _RowProblem(None, f"not an object: got {_type_name(row)}")
            for name in (columns.chosen, columns.rejected):
                if row.get(name) is None:  # absent, JSON null, or a Parquet/Arrow null
                    raise _RowProblem(name, "missing field")
            if shape is None:
                shape = _detect_shape(row, columns)
            if shape == "anthropic-hh":
                prompt, chosen, rejected = _hh_pair(row, columns)
            else:
                prompt, chosen, rejected = _prompted_pair(row, columns)
            pairs.append(PreferencePair(prompt, chosen, rejected, number, source))
        except _RowProblem as problem:
            if strict:
                raise DataError(source, problem.reason, number, problem.field) from None
            skipped.append(SkippedRow(number, problem.field, problem.reason))
    if not pairs:
        if total == 0:
            raise DataError(source, "no rows found")
        category, count = Counter(s.category for s in skipped).most_common(1)[0]
        example = next(s for s in skipped if s.category == category)
        raise DataError(
            source,
            f"no usable preference pairs in {total} rows; most common problem: {category} "
            f"({count} rows), e.g. {example.describe()}",
        )
    assert shape is not None  # a pair exists, so a row was classified
    return PreferenceData(pairs, skipped, shape, source, total)


def load_from_config(cfg: Any) -> PreferenceData:
    """:func:`load_preferences` with the data fields of an ``OrpoConfig``."""
    return load_preferences(
        cfg.data,
        prompt_field=cfg.prompt_field,
        chosen_field=cfg.chosen_field,
        rejected_field=cfg.rejected_field,
        split=cfg.data_split,
        strict=cfg.strict,
    )


def split_holdout(
    pairs: list[PreferencePair], eval_fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split into (train, eval), each in the input order.

    A pair is held out when the SHA-1 of its text falls in the lowest ``eval_fraction`` of 10,000
    buckets. The decision depends on nothing but the pair's own text, so it is the same across runs,
    seeds, row orders and added rows, and duplicated pairs can never straddle train and eval.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    # round(): 0.05 * 10_000 is 500.00000000000006 in floating point, which would admit bucket 500.
    threshold = round(eval_fraction * _HOLDOUT_BUCKETS)
    train: list[PreferencePair] = []
    held: list[PreferencePair] = []
    for pair in pairs:
        (held if _holdout_bucket(pair) < threshold else train).append(pair)
    return train, held


def split_test(
    pairs: list[PreferencePair], test_fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split into (the rest, test), each in the input order: the test split for ``test_fraction``.

    The same hash as :func:`split_holdout`, from the other end: a pair is a test pair when its
    bucket is among the highest ``test_fraction`` of 10,000, so the test split never meets the
    held-out split (the lowest buckets) while ``eval_fraction + test_fraction <= 1``, and the
    held-out split is the same pairs with or without a test split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    first_test_bucket = _HOLDOUT_BUCKETS - round(test_fraction * _HOLDOUT_BUCKETS)
    rest: list[PreferencePair] = []
    test: list[PreferencePair] = []
    for pair in pairs:
        (test if _holdout_bucket(pair) >= first_test_bucket else rest).append(pair)
    return rest, test


def _holdout_bucket(pair: PreferencePair) -> int:
    prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in pair.prompt)
    key = HOLDOUT_SALT + prompt_text + pair.chosen + pair.rejected
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % _HOLDOUT_BUCKETS


# --- rows -> pairs -------------------------------------------------------------------------------


def _detect_shape(row: dict[str, Any], columns: _Columns) -> str:
    values = (row.get(columns.prompt), row[columns.chosen], row[columns.rejected])
    if any(isinstance(v, list) for v in values):
        return "conversational"
    if values[0] is None and any(isinstance(v, str) and _ASSISTANT in v for v in values[1:]):
        return "anthropic-hh"
    # Also the verdict for prompt-less plain strings: every row then reports the missing prompt column.
    return "prompt/chosen/rejected"


def _prompted_pair(row: dict[str, Any], columns: _Columns) -> tuple[tuple[Message, ...], str, str]:
    """Shapes (a) and (b): strings or message lists, with or without a prompt column."""
    raw_prompt, raw_chosen, raw_rejected = row.get(columns.prompt), row[columns.chosen], row[columns.rejected]
    if raw_prompt is not None:
        prompt = _prompt_messages(raw_prompt, columns.prompt)
        chosen = _response(raw_chosen, prompt, columns.chosen)
        rejected = _response(raw_rejected, prompt, columns.rejected)
        return prompt, chosen, rejected
    if not (isinstance(raw_chosen, list) and isinstance(raw_rejected, list)):
        # Plain-text responses carry no conversation to infer a prompt from.
        raise _RowProblem(columns.prompt, "missing field")
    chosen_messages = _messages(raw_chosen, columns.chosen)
    rejected_messages = _messages(raw_rejected, columns.rejected)
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages, strict=False):
        if a != b:
            break
        shared += 1
    where = "after the messages shared with the other response"
    chosen = _single_response(chosen_messages[shared:], columns.chosen, where)
    rejected = _single_response(rejected_messages[shared:], columns.rejected, where)
    return chosen_messages[:shared], chosen, rejected


def _prompt_messages(value: Any, field: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": _valid_text(value, field)},)
    if isinstance(value, list):
        return _messages(value, field)
    raise _RowProblem(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _response(value: Any, prompt: tuple[Message, ...], field: str) -> str:
    if isinstance(value, str):
        return _non_empty(_valid_text(value, field), field)
    if isinstance(value, list):
        messages = _messages(value, field)
        if prompt and messages[: len(prompt)] == prompt:  # the response repeats the prompt: drop it
            messages = messages[len(prompt) :]
        return _single_response(messages, field, "after the prompt")
    raise _RowProblem(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")


def _single_response(messages: tuple[Message, ...], field: str, where: str) -> str:
    if len(messages) != 1:
        raise _RowProblem(field, f"not one assistant turn: {len(messages)} messages {where}")
    if messages[0]["role"] != "assistant":
        raise _RowProblem(
            field, f"not one assistant turn: the message {where} is from '{messages[0]['role']}'"
        )
    return _non_empty(messages[0]["content"], field)


def _messages(value: list[Any], field: str) -> tuple[Message, ...]:
    """Validate a list of chat messages, keeping only role and content (extra keys would break the
    prefix comparisons and mean nothing to a chat template)."""
    out: list[Message] = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise _RowProblem(field, f"wrong type: message {index} is {_type_name(message)}, not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise _RowProblem(field, f"wrong type: message {index} has no string 'role'")
        if role not in ROLES:
            raise _RowProblem(
                field, f"wrong type: message {index} has role '{role}', not one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise _RowProblem(field, f"wrong type: message {index} has no string 'content'")
        out.append({"role": role, "content": _valid_text(content, field)})
    return tuple(out)


def _hh_pair(row: dict[str, Any], columns: _Columns) -> tuple[tuple[Message, ...], str, str]:
    """Shape (c): split two HH transcripts into the shared conversation and the two final replies."""
    chosen, rejected = (_transcript(row[name], name) for name in (columns.chosen, columns.rejected))
    cut = _shared_assistant_end(chosen, rejected)
    if cut is None:
        field = columns.chosen if _ASSISTANT not in chosen else columns.rejected
        raise _RowProblem(field, "no shared Assistant prefix: the transcripts share no 'Assistant:' turn")
    prompt = _parse_transcript(chosen[: cut - len(_ASSISTANT)], columns.chosen)
    responses = []
    for text, field in ((chosen[cut:], columns.chosen), (rejected[cut:], columns.rejected)):
        text = _non_empty(text, field)
        if _HUMAN in text or _ASSISTANT in text:
            # The transcripts diverge one or more turns before their ends: training on this would
            # teach the model to write the user's next turn and its own reply to it.
            raise _RowProblem(
                field, "different prompts: the transcripts differ before their last Assistant turn"
            )
        responses.append(text)
    return prompt, responses[0], responses[1]


def _transcript(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(field, f"wrong type: expected a transcript string, got {_type_name(value)}")
    return _valid_text(value, field)


def _shared_assistant_end(chosen: str, rejected: str) -> int | None:
    """End of the last ``"\\n\\nAssistant:"`` inside the longest common prefix of the two strings.

    Walking back over chosen's markers and testing each prefix is the same as computing the common
    prefix first, but compares at C speed instead of character by character in Python.
    """
    end = len(chosen)
    while (start := chosen.rfind(_ASSISTANT, 0, end)) != -1:
        cut = start + len(_ASSISTANT)
        if rejected.startswith(chosen[:cut]):
            return cut
        end = start
    return None


def _parse_transcript(prefix: str, field: str) -> tuple[Message, ...]:
    # Some HH copies drop the leading blank lines; put them back so every turn has the same marker.
    text = prefix.lstrip()
    if not text.startswith(("Human:", "Assistant:")):
        raise _RowProblem(field, "malformed transcript: it does not start with a 'Human:' turn")
    parts = _TURN.split("\n\n" + text)  # ["", marker, content, marker, content, ...]
    return tuple(
        {"role": "user" if marker == _HUMAN else "assistant", "content": content.strip()}
        for marker, content in zip(parts[1::2], parts[2::2], strict=True)
    )


def _valid_text(text: str, field: str) -> str:
    # Lone surrogates are what surrogateescape made of bytes that are not UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowProblem(field, "invalid UTF-8 bytes") from None
    return text


def _non_empty(text: str, field: str) -> str:
    text = text.strip()
    if not text:
        raise _RowProblem(field, "empty response")
    return text


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
