"""``qlora-orpo COMMAND``: every subcommand's --help and one real call on a tiny model; the TensorBoard sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from qlora_orpo.cli import SUBCOMMANDS, main
from qlora_orpo.training.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog hello world capital France Paris bread flour water".split()


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qlora-orpo {name}")
    if name in ("train", "dry-run"):
        assert "--max-prompt-length" in out and "--report-to" in out and "--save-total-limit" in out


def test_python_dash_m_lists_the_subcommands():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "qlora_orpo", "--help"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for name in SUBCOMMANDS:
        assert name in done.stdout


def test_unknown_subcommand_and_bad_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert main(["train", "--beta", "-1", "--dry-run"]) == 2
    assert "beta" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    with open(root / "pairs.jsonl", "w") as handle:
        for _ in range(24):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=g)]
            handle.write(json.dumps({"prompt": " ".join(words[:3]), "chosen": "hello world " + " ".join(words[3:6]),
                                     "rejected": "the lazy dog " + " ".join(words[5:8])}) + "\n")
    # A TRL-style config file for the training call: the familiar keys reach the run.
    (root / "trl.yaml").write_text(
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nlogging_steps: 1\nsave_steps: 2\n"
        "report_to: [tensorboard]\nlr_scheduler_type: constant\nlearning_rate: 1.0e-2\n"
    )
    common = ["--model", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--quant", "none",
              "--compute-dtype", "float32", "--device", "cpu", "--max-length", "48", "--lora-r", "4",
              "--logits-chunk-size", "8", "--eval-fraction", "0.25", "--eval-max-pairs", "4"]
    code = main(["train", "--config", str(root / "trl.yaml"), *common, "--max-steps", "3",
                 "--output-dir", str(root / "runs"), "--run-name", "t"])
    assert code == 0
    return {"root": root, "run": root / "runs" / "t", "common": common}


def test_train_writes_a_tensorboard_event_file_that_tensorboard_reads(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny["run"]
    config = (run_dir / "config.yaml").read_text()
    assert "report_to: tensorboard" in config and "max_prompt_length: 24" in config  # resolved and recorded
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    events = accumulator.Scalars("train/loss")
    assert [e.step for e in events] == [r["step"] for r in train] == [1, 2, 3]
    for event, record in zip(events, train, strict=True):
        assert event.value == pytest.approx(record["loss"], rel=1e-6)
    assert "eval_after/reward_accuracy" in accumulator.Tags()["scalars"]


def test_tensorboard_sink_of_a_resumed_run_drops_the_replayed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, "tensorboard") as logger:
        for step in (1, 2, 3):
            logger.log({"step": step, "split": "train", "loss": float(step)})
    with MetricsLogger(tmp_path, "tensorboard", resume_step=2) as logger:
        logger.log({"step": 3, "split": "train", "loss": 30.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    from qlora_orpo.core.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="report_to: wandb is not installed"):
        MetricsLogger(tmp_path, "wandb")


def test_dry_run_eval_chat_plot_export_plan_on_the_trained_run(tiny, tmp_path, capsys):
    run_dir, common = tiny["run"], tiny["common"]
    capsys.readouterr()
    assert main(["dry-run", *common]) == 0
    assert "dry run: nothing trained." in capsys.readouterr().out
    assert main(["eval", "--adapter", str(run_dir / "adapter"), "--json", "-", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"]["pairs"] == result["base"]["pairs"] > 0
    assert main(["chat", "--adapter", str(run_dir / "adapter"), "--prompt", "hello", "--max-new-tokens", "3",
                 "--device", "cpu", "--compare"]) == 0
    out = capsys.readouterr().out
    assert out.count("[base]") == 1 and out.count("[adapter]") == 1
    assert main(["plot", str(run_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["export", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["max_abs_diff"] <= exported["tolerance"] and (tmp_path / "merged" / "config.json").is_file()
    assert main(["plan", str(tiny["root"] / "model"), "--max-length", "48", "--ram", "2"]) == 0
    out = capsys.readouterr().out
    assert "--step split" in out and "largest max_length" in out


def test_resume_from_the_command_line_says_what_changed(tiny, capsys):
    import shutil

    run_dir = tiny["run"].with_name("t2")
    shutil.copytree(tiny["run"], run_dir)
    assert main(["train", "--resume", "--output-dir", str(run_dir.parent), "--run-name", "t2",
                 "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "max_steps: 3 -> 4" in err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert main(["train", "--resume", "--output-dir", str(run_dir.parent), "--run-name", "t2",
                 "--max-length", "64"]) == 2
    assert "max_length (48 in the run, 64 given)" in capsys.readouterr().err


def test_bench_subcommand_runs_its_worker_through_python_dash_m(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--lengths", "32", "--methods", "split", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["peak_above_baseline_mib"] > 0
