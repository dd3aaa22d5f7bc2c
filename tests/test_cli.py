"""The command line: one-line errors naming file/row/field, --dry-run, --strict, every module importable."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest
from conftest import build_tiny_llama, build_tokenizer

import qlora_orpo
from qlora_orpo.cli.train import main


@pytest.fixture
def tiny_model_dir(tmp_path):
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "hello", "chosen": "hello world", "rejected": "the lazy dog"}


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(qlora_orpo.__path__, "qlora_orpo.")]
    assert "qlora_orpo.training.loop" in names  # the walk reaches into the subpackages
    for name in names:
        importlib.import_module(name)


def test_dry_run_reports_shape_counts_lengths_and_exits_zero(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 6 + [{"prompt": "x", "chosen": "y"}, "{broken"])
    code = main(["--dry-run", "--model", str(tiny_model_dir), "--data", str(data), "--eval-fraction", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "prompt/chosen/rejected (detected)" in out
    assert "8 read, 6 pairs kept, 2 skipped" in out
    assert "row 7, field 'rejected'" in out
    assert "row 8" in out and "invalid JSON" in out
    assert "p50=" in out and "truncated:" in out
    assert "dry run: nothing trained." in out


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([GOOD, {"prompt": "x", "chosen": "y"}], r"d\.jsonl, row 2, field 'rejected'"),
        ([GOOD, {"prompt": "x", "chosen": 3, "rejected": "z"}], r"d\.jsonl, row 2, field 'chosen'"),
        ([GOOD, {"prompt": "x", "chosen": "  ", "rejected": "z"}], r"d\.jsonl, row 2, field 'chosen'.*empty"),
        ([GOOD, "{not json"], r"d\.jsonl, row 2.*invalid JSON"),
    ],
)
def test_strict_bad_row_is_one_line_error_without_traceback(tmp_path, tiny_model_dir, capsys, rows, expected):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(["--dry-run", "--strict", "--model", str(tiny_model_dir), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(expected, err), err


def test_non_utf8_bytes_name_row_and_field(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "a", "chosen": "caf\xe9", "rejected": "b"}\n')
    code = main(["--dry-run", "--strict", "--model", str(tiny_model_dir), "--data", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "row 2" in err and "'chosen'" in err and "UTF-8" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
        (["--data", "__FILE__.txt"], ".txt"),
        (["--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
        (["--beta", "-1"], "beta"),
        (["--max-length", "10", "--max-prompt-length", "20"], "max_prompt_length"),
    ],
)
def test_fatal_errors_are_one_line(tmp_path, capsys, args, expected):
    args = [a.replace("__FILE__", str(tmp_path / "pairs")) for a in args]
    (tmp_path / "pairs.txt").write_text("x")
    code = main(["--dry-run", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err


def test_config_typo_names_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("max_step: 3\n")
    assert main(["--dry-run", "--config", str(path)]) == 2
    assert "max_step" in capsys.readouterr().err


def test_public_api_names_resolve():
    for name in qlora_orpo.__all__:
        assert callable(getattr(qlora_orpo, name)), name
