"""Tests of qlora_orpo.data (sources and preferences): sources, row shapes, bad rows, and the hash-based hold-out split."""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import DataError
from qlora_orpo.data.preferences import (
    EMBEDDED_DATA,
    SHAPES,
    PreferenceData,
    PreferencePair,
    load_from_config,
    load_preferences,
    resolve_data_path,
    split_holdout,
)

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": " Paris ", "rejected": "Rome"},
]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def hh(*turns: str) -> str:
    """An HH transcript from alternating Human/Assistant turn texts."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def skipped_one(data: PreferenceData) -> tuple[int, str | None, str]:
    assert len(data.skipped) == 1, data.describe_skipped()
    s = data.skipped[0]
    return s.row, s.field, s.reason


# --- formats ------------------------------------------------------------------------------------


def _jsonl(tmp: Path) -> Path:
    return write_jsonl(tmp / "d.jsonl", ROWS)


def _jsonl_gz(tmp: Path) -> Path:
    path = tmp / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    return path


def _json_list(tmp: Path) -> Path:
    (tmp / "d.json").write_text(json.dumps(ROWS))
    return tmp / "d.json"


def _json_data(tmp: Path) -> Path:
    (tmp / "d.json").write_text(json.dumps({"data": ROWS, "version": 1}))
    return tmp / "d.json"


def _csv(tmp: Path) -> Path:
    with open(tmp / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(ROWS)
    return tmp / "d.csv"


def _csv_gz(tmp: Path) -> Path:
    text = _csv(tmp).read_bytes()
    (tmp / "d.csv.gz").write_bytes(gzip.compress(text))
    return tmp / "d.csv.gz"


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp / "d.parquet")
    return tmp / "d.parquet"


def _saved_dataset(tmp: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


@pytest.mark.parametrize(
    "writer", [_jsonl, _jsonl_gz, _json_list, _json_data, _csv, _csv_gz, _parquet, _saved_dataset]
)
def test_every_format_loads_the_same_pairs(tmp_path: Path, writer) -> None:
    path = writer(tmp_path)
    data = load_preferences(str(path))
    assert data.shape == "prompt/chosen/rejected"
    assert data.total_rows == 2 and not data.skipped
    assert [p.row for p in data.pairs] == [1, 2]
    first, second = data.pairs
    assert first == PreferencePair((user("What is 2+2?"),), "4", "5", 1, str(path))
    assert second.chosen == "Paris"  # responses are stripped


def test_saved_dataset_dict_takes_the_requested_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_preferences(str(tmp_path / "dd")).pairs) == 2
    assert len(load_preferences(str(tmp_path / "dd"), split="test").pairs) == 1
    with pytest.raises(DataError, match="no split 'validation'; available: train, test"):
        load_preferences(str(tmp_path / "dd"), split="validation")


def test_unresolvable_dataset_name_fails_fast_without_the_hub() -> None:
    import datasets.config
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    start = time.monotonic()
    with pytest.raises(DataError, match="could not resolve it locally.*no hub is reachable"):
        load_preferences("someorg/no-such-dataset-qlora-orpo-test")
    assert time.monotonic() - start < 10  # online, each attempt retries for ~20 s
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == before  # offline switch restored


# --- shapes -------------------------------------------------------------------------------------


def test_conversational_without_prompt_uses_the_shared_prefix(tmp_path: Path) -> None:
    convo = [user("hi"), assistant("hello"), user("tell me a joke")]
    rows = [{"chosen": [*convo, assistant("A pun.")], "rejected": [*convo, assistant("No.")]}]
    data = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert data.shape == "conversational"
    assert data.pairs[0].prompt == tuple(convo)
    assert (data.pairs[0].chosen, data.pairs[0].rejected) == ("A pun.", "No.")


def test_conversational_with_prompt_strips_a_repeated_prompt(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, user("hi")]
    rows = [
        {"prompt": prompt, "chosen": [*prompt, assistant("Hello!")], "rejected": [assistant("Go away.")]},
        {"prompt": prompt, "chosen": "Hey.", "rejected": [assistant("What?")]},  # string chosen is fine
    ]
    data = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert data.shape == "conversational" and not data.skipped
    assert [p.prompt for p in data.pairs] == [tuple(prompt)] * 2
    assert [(p.chosen, p.rejected) for p in data.pairs] == [("Hello!", "Go away."), ("Hey.", "What?")]


def test_conversational_with_string_prompt(tmp_path: Path) -> None:
    rows = [{"prompt": "hi", "chosen": [user("hi"), assistant("hello")], "rejected": [assistant("bye")]}]
    data = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert data.pairs[0].prompt == (user("hi"),)
    assert (data.pairs[0].chosen, data.pairs[0].rejected) == ("hello", "bye")


def test_conversational_response_must_be_one_assistant_message(tmp_path: Path) -> None:
    rows = [{"prompt": "hi", "chosen": [user("other"), assistant("x")], "rejected": [assistant("y")]}]
    data = load_preferences(str(write_jsonl(tmp_path / "c.jsonl", rows + ROWS)))
    row, field, reason = skipped_one(data)
    assert (row, field) == (1, "chosen")
    assert reason.startswith("not one assistant turn: 2 messages after the prompt")


def test_hh_multi_turn_splits_at_the_last_shared_assistant_turn(tmp_path: Path) -> None:
    shared = ("How do I bake bread?", "Flour, water, yeast.", "How long?")
    rows = [{"chosen": hh(*shared, "About an hour.  "), "rejected": hh(*shared, "Forever.")}]
    data = load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", rows)))
    assert data.shape == "anthropic-hh"
    pair = data.pairs[0]
    assert pair.prompt == (user(shared[0]), assistant(shared[1]), user(shared[2]))
    assert (pair.chosen, pair.rejected) == ("About an hour.", "Forever.")


def test_hh_responses_with_a_common_start_still_split_at_the_turn(tmp_path: Path) -> None:
    rows = [{"chosen": hh("q", "I think yes."), "rejected": hh("q", "I think no.")}]
    pair = load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", rows))).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ((user("q"),), "I think yes.", "I think no.")


def test_hh_response_running_into_further_turns_is_skipped(tmp_path: Path) -> None:
    rows = [
        {"chosen": hh("q", "a", "q2", "a2"), "rejected": hh("q", "b")},
        {"chosen": hh("q", "x"), "rejected": hh("q", "y")},
    ]
    row, field, reason = skipped_one(load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", rows))))
    assert (row, field) == (1, "chosen") and reason.startswith("different prompts")


def test_column_remapping_and_errors_name_the_users_column(tmp_path: Path) -> None:
    rows = [{"question": "q", "good": "g", "bad": "b"}, {"question": "q", "good": "g"}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    kwargs = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    data = load_preferences(str(path), **kwargs)
    assert (data.pairs[0].prompt, data.pairs[0].chosen, data.pairs[0].rejected) == ((user("q"),), "g", "b")
    assert skipped_one(data) == (2, "bad", "missing field")
    with pytest.raises(DataError) as info:
        load_preferences(str(path), strict=True, **kwargs)
    assert str(info.value) == f"{path}, row 2, field 'bad': missing field"


def test_load_from_config_reads_the_data_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "x", "c": "y", "r": "z"}])
    cfg = OrpoConfig(data=str(path), prompt_field="q", chosen_field="c", rejected_field="r")
    assert load_from_config(cfg).pairs[0].chosen == "y"


# --- bad rows -----------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", "missing field"),
    ({"prompt": "p", "chosen": 42, "rejected": "r"}, "chosen", "wrong type"),
    ({"prompt": [{"content": "hi"}], "chosen": "c", "rejected": "r"}, "prompt", "wrong type"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "chosen", "wrong type"),
    ({"prompt": "p", "chosen": "c", "rejected": "   "}, "rejected", "empty response"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing field"),
    (["p", "c", "r"], None, "not an object"),
]


@pytest.mark.parametrize(("bad", "field", "category"), BAD_ROWS)
def test_bad_row_is_skipped_with_row_field_and_reason(tmp_path: Path, bad, field, category) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    data = load_preferences(str(path))
    assert len(data.pairs) == 2 and data.total_rows == 3
    row, got_field, reason = skipped_one(data)
    assert (row, got_field, reason.split(":")[0]) == (2, field, category)
    assert data.skip_reasons() == {category: 1}
    with pytest.raises(DataError) as info:
        load_preferences(str(path), strict=True)
    message = str(info.value)
    assert message.startswith(str(path)) and "row 2" in message
    assert info.value.row == 2 and info.value.field == field
    if field is not None:
        assert f"field '{field}'" in message


def test_hh_without_shared_assistant_prefix(tmp_path: Path) -> None:
    rows = [
        {"chosen": hh("q", "a"), "rejected": hh("something else", "b")},
        {"chosen": hh("q", "a"), "rejected": hh("q", "b")},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    data = load_preferences(str(path))
    assert data.skip_reasons() == {"no shared Assistant prefix": 1}
    assert data.describe_skipped()[0].startswith("row 1, field 'rejected': no shared Assistant prefix")
    with pytest.raises(DataError, match=r"hh\.jsonl, row 1, field 'rejected': no shared Assistant prefix"):
        load_preferences(str(path), strict=True)


def test_non_utf8_bytes_cost_only_their_row(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD).encode(), b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "r"}', b""]
    path.write_bytes(b"\n".join([*lines, json.dumps(GOOD).encode(), b""]))
    data = load_preferences(str(path))
    assert len(data.pairs) == 2
    assert [p.row for p in data.pairs] == [1, 4]  # the blank line 3 is not a row but is counted
    assert skipped_one(data) == (2, "chosen", "invalid UTF-8 bytes")


def test_broken_json_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"prompt": "p", "chosen": \n' + json.dumps(GOOD) + "\n")
    data = load_preferences(str(path))
    row, field, reason = skipped_one(data)
    assert (row, field) == (2, None) and reason.startswith("invalid JSON: ")
    with pytest.raises(DataError, match=r"broken\.jsonl, row 2: invalid JSON"):
        load_preferences(str(path), strict=True)


def test_csv_rows_are_numbered_without_the_header(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\np,"multi\nline",r\np,,r\n')
    data = load_preferences(str(path))
    assert data.pairs[0].chosen == "multi\nline"
    assert skipped_one(data) == (2, "chosen", "empty response")


def test_no_surviving_pair_names_the_most_common_problem(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "c"},
        {"prompt": "p", "chosen": "c"},
        {"prompt": "p", "chosen": 1, "rejected": "r"},
    ]
    with pytest.raises(DataError, match=r"no usable preference pairs in 3 rows.*missing field \(2 rows\)"):
        load_preferences(str(write_jsonl(tmp_path / "x.jsonl", rows)))


# --- whole-source errors ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences("./data/nope")  # explicitly relative: a path, not a dataset name
    with pytest.raises(DataError, match="not a file or directory, and datasets.load_dataset could not"):
        load_preferences("data/nope")  # could be a hub-style "org/name", so datasets gets a try
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences("nope.csv.gz")


def test_unknown_format_names_the_suffix_and_the_accepted_ones(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unknown data format '\.txt'; accepted: \.jsonl, \.json"):
        load_preferences(str(tmp_path / "d.txt"))


def test_unparseable_json_file_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[\n  {"prompt": "p",\n  oops\n]')
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 3"):
        load_preferences(str(tmp_path / "d.json"))
    (tmp_path / "o.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="a 'data' list"):
        load_preferences(str(tmp_path / "o.json"))


def test_unreadable_parquet_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"d\.parquet: cannot read Parquet file"):
        load_preferences(str(tmp_path / "d.parquet"))
    (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: cannot read file"):
        load_preferences(str(tmp_path / "d.jsonl.gz"))


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows found"):
        load_preferences(str(tmp_path / "e.jsonl"))


# --- the embedded data --------------------------------------------------------------------------


def test_embedded_hh_file() -> None:
    assert resolve_data_path("embedded") == str(EMBEDDED_DATA)
    assert resolve_data_path("x.jsonl") == "x.jsonl"
    start = time.monotonic()
    data = load_preferences("embedded")
    assert time.monotonic() - start < 2.0
    assert data.shape == "anthropic-hh" and data.shape in SHAPES
    assert data.total_rows == 2312
    # 4 rows have an empty chosen reply; in 5 the two transcripts diverge a turn or more before their
    # ends, so one "response" would contain further Human/Assistant turns.
    assert data.skip_reasons() == {"different prompts": 5, "empty response": 4}
    assert [s.row for s in data.skipped] == [87, 517, 926, 1104, 1255, 1689, 1951, 1953, 2037]
    assert len(data.pairs) == 2312 - 9
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in data.pairs)
    assert all(p.chosen and p.rejected for p in data.pairs)
    assert data.pairs[0].prompt[0] == user("what are some pranks with a pen i can do?")


# --- hold-out split -----------------------------------------------------------------------------


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair((user(f"q{i}"),), f"good {i}", f"bad {i}", i + 1, "t") for i in range(n)]


def test_split_holdout_is_deterministic_and_order_independent() -> None:
    pairs = _pairs(4000)
    train, held = split_holdout(pairs, 0.1)
    assert len(train) + len(held) == 4000
    assert 300 < len(held) < 500  # ~10 %
    assert [p.row for p in train] == sorted(p.row for p in train)  # input order kept
    again_train, again_held = split_holdout(list(reversed(pairs)), 0.1)
    assert {p.row for p in again_held} == {p.row for p in held}
    assert split_holdout(pairs, 0.1) == (train, held)
    # A pair's side depends only on its text, not on the row number or source.
    moved = PreferencePair(held[0].prompt, held[0].chosen, held[0].rejected, 99999, "elsewhere")
    assert split_holdout([moved], 0.1) == ([], [moved])


def test_split_holdout_fractions() -> None:
    pairs = _pairs(500)
    assert split_holdout(pairs, 0.0) == (pairs, [])
    small_train, small_held = split_holdout(pairs, 0.05)
    big_train, big_held = split_holdout(pairs, 0.5)
    assert set(map(id, small_held)) <= set(map(id, big_held))  # growing the fraction only adds
    assert 150 < len(big_held) < 350
    with pytest.raises(ValueError):
        split_holdout(pairs, 1.0)
