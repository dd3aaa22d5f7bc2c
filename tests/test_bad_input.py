"""Bad input across the commands, one table (issue 20): one ``error:`` line naming the flag, file or row,
exit code 2, nothing written.

Every train case names a data file that does not exist as well, so a value that were
wrongly accepted fails on the data instead of training (and the match on the message tells).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_orpo.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "nonutf8.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    (root / "torn.jsonl").write_text('{"prompt": "')
    (root / "huge.jsonl").write_text("x" * 10_000_000 + "\n")  # a 10 MB single row
    (root / "empty.jsonl").write_text("")
    (root / "no-fields.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (root / "tagged.yaml").write_text("beta: !!python/object/apply:os.system [echo hostile]\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "config.txt").write_text("beta: 0.1\n")
    adapter = root / "tagged-adapter"  # an adapter whose card carries a YAML tag
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "README.md").write_text("---\nqlora_orpo: !!python/object/apply:os.system [echo hostile]\n---\n")
    (root / "outside.json").write_text(json.dumps({"secret": "not the adapter's"}))
    save_file({"w": torch.zeros(1)}, str(root / "outside.safetensors"))
    for name, linked in (("link-weights", "adapter_model.safetensors"), ("link-tokenizer", "tokenizer_config.json")):
        linking = root / f"{name}-adapter"  # otherwise the tagged adapter with a plain card
        linking.mkdir()
        (linking / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        save_file({"w": torch.zeros(1)}, str(linking / "adapter_model.safetensors"))
        (linking / "README.md").write_text("---\nqlora_orpo: {}\n---\n")
        (linking / linked).unlink(missing_ok=True)
        (linking / linked).symlink_to(root / ("outside.safetensors" if linked.endswith("safetensors") else "outside.json"))
    notjson = root / "notjson-adapter"
    notjson.mkdir()
    (notjson / "adapter_config.json").write_text("{not json")
    return root


MISSING = "missing.jsonl"
# (argv with {b} for the fixture directory, what the one line must contain)
CASES = [
    (["train", "--learning-rate", "abc", "--data", "{b}/" + MISSING], "argument --learning-rate: invalid float value"),
    (["train", "--beta", "", "--data", "{b}/" + MISSING], "argument --beta"),
    (["train", "--beta", "nan", "--data", "{b}/" + MISSING], "beta: nan"),
    (["train", "--max-steps", "1.5", "--data", "{b}/" + MISSING], "argument --max-steps"),
    (["train", "--lora-r", "0", "--data", "{b}/" + MISSING], "lora_r: 0"),
    (["train", "--eval-fraction", "1.5", "--data", "{b}/" + MISSING], "eval_fraction"),
    (["train", "--quant", "int3", "--data", "{b}/" + MISSING], "argument --quant: invalid choice"),
    (["train", "--run-name", "../outside", "--data", "{b}/" + MISSING], "run_name: '../outside'"),
    (["train", "--run-name", "{b}/absolute", "--data", "{b}/" + MISSING], "/absolute' must be a plain directory name"),
    (["train", "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    (["train", "--config", "{b}/tagged.yaml", "--data", "{b}/" + MISSING], "tagged.yaml: cannot parse config"),
    (["train", "--config", "{b}/nonutf8.jsonl", "--data", "{b}/" + MISSING], "nonutf8.jsonl"),
    (["train", "--config", "{b}/list.yaml", "--data", "{b}/" + MISSING], "list.yaml"),
    (["train", "--config", "{b}/config.txt", "--data", "{b}/" + MISSING], "config.txt"),
    (["train", "--config", "{b}/absent.yaml"], "absent.yaml: config file not found"),
    (["train", "--data", "{b}/" + MISSING], MISSING + ": no such file"),
    (["train", "--data", "{b}/nonutf8.jsonl"], "nonutf8.jsonl"),
    (["train", "--data", "{b}/torn.jsonl"], "torn.jsonl"),
    (["train", "--data", "{b}/huge.jsonl"], "huge.jsonl"),
    (["train", "--data", "{b}/empty.jsonl"], "empty.jsonl"),
    (["train", "--data", "{b}/no-fields.jsonl"], "no-fields.jsonl"),
    (["dry-run", "--data", "{b}/torn.jsonl"], "torn.jsonl"),
    (["export", "--adapter", "{b}/nowhere", "--out", "{b}/out/merged"], "nowhere: no such adapter directory"),
    (["export", "--adapter", "{b}/tagged-adapter", "--out", "{b}/out/merged"], "README.md: cannot parse"),
    (["export", "--adapter", "{b}/notjson-adapter", "--out", "{b}/out/merged"], "adapter_config.json: cannot read"),
    (["export", "--adapter", "{b}/nowhere"], "the following arguments are required: --out"),
    (["chat", "--adapter", "{b}/nowhere"], "nowhere: no such adapter directory"),
    (["chat", "--adapter", "{b}/tagged-adapter"], "README.md: cannot parse"),
    (["eval", "--adapter", "{b}/nowhere"], "nowhere"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    *[([command, "--adapter", "{b}/" + f"{name}-adapter", *extra], f"{name}-adapter/{linked}: a symlink to")
      for command, extra in (("chat", []), ("eval", []), ("export", ["--out", "{b}/out/merged"]))
      for name, linked in (("link-weights", "adapter_model.safetensors"), ("link-tokenizer", "tokenizer_config.json"))],
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a[:3]).replace("{b}/", "") for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad, argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(bad)  # a default output_dir ("runs") would land here
    out = bad / "out"
    argv = [a.format(b=bad) for a in argv]
    if argv[0] in ("train", "dry-run"):
        argv += ["--output-dir", str(out)]
    before = sorted(p.name for p in bad.iterdir())
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert expected in lines[0]
    assert not out.exists(), f"{argv[0]} wrote {sorted(p.name for p in out.rglob('*'))}"
    assert sorted(p.name for p in bad.iterdir()) == before
