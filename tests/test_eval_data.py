"""``--eval-data``: evaluation, select_best, the end-of-run table, the dry run and ``qlora-orpo eval`` use it."""

from __future__ import annotations

import json

import pytest
from userfeatures import pair_rows, save_tiny_model, train_flags, write_csv, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.config import OrpoConfig
from qlora_orpo.training.metrics import read_metrics


def hh_rows(rows: list[dict]) -> list[dict]:
    """The same pairs as Anthropic HH transcripts (no prompt column): another row shape."""
    return [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    train_rows = pair_rows(20, seed=0)
    eval_rows = pair_rows(6, seed=1) + train_rows[:2]  # two pairs the training data also holds
    return {"root": root, "model": save_tiny_model(root / "model"), "train_rows": train_rows,
            "data": write_jsonl(root / "train.jsonl", train_rows),
            "eval": write_csv(root / "eval.csv", hh_rows(eval_rows))}  # CSV of HH transcripts


@pytest.fixture(scope="module")
def trained(tiny):
    out = tiny["root"] / "runs"
    code = main(["train", *train_flags(tiny["model"], tiny["data"], out), "--eval-data", str(tiny["eval"]),
                 "--max-steps", "2", "--eval-every", "1", "--select-best", "--save-every", "1",
                 "--health-prompts", "2", "--health-max-new-tokens", "4"])
    assert code == 0
    return out / "t"


def test_the_run_evaluates_every_pair_of_the_eval_file_and_trains_on_all_of_data(trained, tiny, capsys):
    evals = [r for r in read_metrics(trained / "metrics.jsonl") if r["split"] == "eval"]
    assert {r["tag"] for r in evals} >= {"before", "periodic", "after"}  # select_best's periodic scores too
    assert {r["pairs"] for r in evals} == {8}  # the eval file's 8 pairs, not a share of the 20 training pairs
    result = json.loads((trained / "evaluation.json").read_text())
    assert result["pairs"]["data"] == str(tiny["eval"]) and result["pairs"]["held_out"] == 8
    assert result["settings"]["eval_data"] == str(tiny["eval"])
    assert f"of 8 in the evaluation data {tiny['eval']}" in (trained / "evaluation.md").read_text()
    assert OrpoConfig.from_file(trained / "config.yaml").eval_data == str(tiny["eval"])


def test_the_training_log_counts_all_pairs_and_warns_about_shared_ones(tiny, capsys):
    out = tiny["root"] / "runs-log"
    assert main(["train", *train_flags(tiny["model"], tiny["data"], out), "--eval-data", str(tiny["eval"]),
                 "--max-steps", "1", "--save-every", "0", "--eval-max-pairs", "2"]) == 0
    err = capsys.readouterr().err
    assert "tokenised: 20 train pairs" in err  # all of --data: nothing held out of it
    assert "warning: 2 evaluation pair(s) also occur in the training data" in err


def test_dry_run_counts_both_and_warns_about_pairs_in_both(tiny, capsys):
    flags = train_flags(tiny["model"], tiny["data"], tiny["root"] / "dry")
    assert main(["dry-run", *flags, "--eval-data", str(tiny["eval"])]) == 0
    out = capsys.readouterr().out
    assert f"eval data: {tiny['eval']}" in out and "shape:     anthropic-hh" in out
    assert "split:     20 train (all of data) / 8 held out (all of eval data)" in out
    assert f"warning: 2 evaluation pair(s) also occur in the training data (e.g. {tiny['eval']}, row 7)" in out
    assert main(["dry-run", *flags]) == 0  # without it: the hash share, and no warning
    out = capsys.readouterr().out
    assert "eval_fraction=0.05" in out and "warning" not in out


def test_eval_command_uses_the_runs_eval_file_and_takes_the_flag(trained, tiny, capsys):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--json", "-", "--no-progress",
                 "--health-prompts", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"]["data"] == str(tiny["eval"]) and result["pairs"]["evaluated"] == 8  # from the card
    other = write_jsonl(tiny["root"] / "other.jsonl", pair_rows(3, seed=5))
    assert main(["eval", "--model", str(tiny["model"]), "--eval-data", str(other), "--json", "-", "--no-progress",
                 "--health-prompts", "0", "--quant", "none", "--compute-dtype", "float32", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"]["data"] == str(other) and result["pairs"]["held_out"] == 3


def test_a_bad_eval_data_value_is_one_error_naming_the_field():
    from qlora_orpo.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval_data\[1\]: needs 'path'"):
        OrpoConfig(eval_data=[{"split": "test"}])
