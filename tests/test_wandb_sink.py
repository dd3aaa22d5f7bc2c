"""``--report-to wandb`` with a fake ``wandb`` module: what the sink hands W&B, read back after a real run.

The real package is not installed here (and no hub is reachable), so a stand-in records
``wandb.init``'s arguments, every ``run.log`` and ``run.finish``, as an offline run would write them.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.training.metrics import read_metrics


class FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def fake_wandb(runs: list[FakeRun]) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec callers need one

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module.init = init
    return module


def test_a_run_reports_its_config_and_every_scalar_to_wandb_offline(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(runs))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    assert main(["train", *train_flags(model, data, tmp_path / "runs", "wb"), "--report-to", "wandb",
                 "--max-steps", "3", "--save-every", "0", "--eval-fraction", "0.25"]) == 0
    (run,) = runs
    run_dir = tmp_path / "runs" / "wb"
    assert run.init["mode"] == "offline" and run.init["dir"] == str(run_dir) and run.init["name"] == "wb"
    assert run.init["config"]["max_steps"] == 3 and run.init["config"]["data"] == str(data)  # the resolved config
    assert run.finished
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    logged = {step: values for step, values in run.logged if "train/loss" in values}
    assert sorted(logged) == [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert logged[record["step"]]["train/loss"] == record["loss"]
    assert any("eval_after/reward_accuracy" in values for _, values in run.logged)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's WANDB_MODE wins
    assert main(["train", *train_flags(model, data, tmp_path / "runs", "wb2"), "--report-to", "wandb",
                 "--max-steps", "1", "--save-every", "0", "--eval-fraction", "0"]) == 0
    assert runs[-1].init["mode"] == "disabled"
