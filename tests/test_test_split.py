"""``test_fraction``: a test split that training, periodic evaluation and ``select_best`` never see.

The held-out split chooses the checkpoint (and, through sweeps, the recipe), so its figure is
biased upwards; the test split is the same fixed hash from the other end, scored once at the
end of a run (``test.json``/``test.md``).
"""

from __future__ import annotations

import json

import pytest
from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.config import ConfigError, OrpoConfig
from qlora_orpo.data.mixture import load_run_data, pair_key
from qlora_orpo.data.preferences import PreferencePair, split_holdout, split_test
from qlora_orpo.training.metrics import read_metrics


def synthetic_pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(prompt=({"role": "user", "content": f"question {i}"},), chosen=f"yes {i}",
                           rejected=f"no {i}", row=i, source="synthetic") for i in range(n)]


def test_the_test_split_never_meets_the_held_out_split_and_leaves_it_unchanged():
    pairs = synthetic_pairs(4000)
    rest, test = split_test(pairs, 0.2)
    train, held = split_holdout(rest, 0.3)
    _, held_without_test = split_holdout(pairs, 0.3)
    assert held == held_without_test  # adding a test split moves no pair out of the held-out split
    assert not {pair_key(p) for p in test} & {pair_key(p) for p in held + train}
    assert len(train) + len(held) + len(test) == len(pairs)
    assert 0.17 < len(test) / len(pairs) < 0.23 and 0.27 < len(held) / len(pairs) < 0.33
    assert split_test(list(reversed(pairs)), 0.2)[1] == list(reversed(test))  # the pair's text decides, not its row
    assert split_test(pairs, 0.0) == (pairs, [])


def test_a_test_split_too_large_to_leave_training_data_is_one_line():
    with pytest.raises(ConfigError, match="test_fraction: 0.5 with eval_fraction 0.5"):
        OrpoConfig(eval_fraction=0.5, test_fraction=0.5)


def test_a_run_scores_base_and_adapter_once_on_a_test_split_nothing_else_saw(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    flags = [*train_flags(model, data, tmp_path / "runs", "split"), "--max-steps", "4", "--save-every", "2",
             "--eval-every", "2", "--select-best", "--eval-fraction", "0.25", "--test-fraction", "0.25"]
    assert main(["train", *flags]) == 0
    run_dir = tmp_path / "runs" / "split"
    loaded = load_run_data(OrpoConfig(data=str(data), eval_fraction=0.25, test_fraction=0.25))
    assert loaded.test and loaded.held_out
    test_keys = {pair_key(p) for p in loaded.test}
    assert not test_keys & {pair_key(p) for p in loaded.train + loaded.held_out}

    result = json.loads((run_dir / "test.json").read_text())
    assert result["pairs"]["split"] == "test" and result["pairs"]["evaluated"] == len(loaded.test)
    held = json.loads((run_dir / "evaluation.json").read_text())
    assert held["pairs"]["evaluated"] == len(loaded.held_out)  # selection saw the held-out pairs only
    assert result["selected_step"] == held["selected_step"]  # the test scores the adapter that ships
    change = result["change"]["reward_accuracy"]
    assert change["change"] == pytest.approx(result["adapter"]["reward_accuracy"] - result["base"]["reward_accuracy"])
    assert (run_dir / "test.md").read_text().startswith(f"Test split: {len(loaded.test)} pairs")
    records = read_metrics(run_dir / "metrics.jsonl")
    (test_record,) = [r for r in records if r["split"] == "test"]
    assert test_record["pairs"] == len(loaded.test)
    assert test_record["reward_accuracy"] == result["adapter"]["reward_accuracy"]
    periodic = [r for r in records if r["split"] == "eval"]
    assert periodic and all(r["pairs"] == len(loaded.held_out) for r in periodic)
    (summary,) = [r for r in records if r["split"] == "summary"]
    assert summary["test"]["pairs"] == len(loaded.test)

    out = tmp_path / "eval-test.json"
    assert main(["eval", "--adapter", str(run_dir / "adapter"), "--test", "--health-prompts", "0",
                 "--json", str(out), "--no-progress"]) == 0
    standalone = json.loads(out.read_text())  # the eval command finds the same split from the adapter's card
    assert standalone["pairs"]["evaluated"] == len(loaded.test) and standalone["pairs"]["split"] == "test"
    for side in ("base", "adapter"):
        assert standalone[side]["reward_accuracy"] == result[side]["reward_accuracy"]
        assert standalone[side]["nll"] == pytest.approx(result[side]["nll"], rel=1e-4)

    capsys.readouterr()
    assert main(["train", *flags[:-2], "--test-fraction", "0.25", "--run-name", "again"]) == 0
    assert "test: the base's scores on" in capsys.readouterr().err  # the base's test scores are cached too
    again = json.loads((tmp_path / "runs" / "again" / "test.json").read_text())
    assert again["base"] == result["base"]


def test_dry_run_counts_the_test_split(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    assert main(["dry-run", "--model", str(model), "--data", str(data), "--test-fraction", "0.25"]) == 0
    out = capsys.readouterr()
    assert "test (test_fraction=0.25; scored once, at the end)" in out.out + out.err
