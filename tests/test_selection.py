"""Best-checkpoint selection: lowest held-out loss among healthy candidates, restored at the end; the recipe file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import tiny_config, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from qlora_orpo.config import OrpoConfig
from qlora_orpo.evaluation.selection import BestCheckpoint
from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.metrics import read_metrics

BASE = {"ended_rate": 0.5, "seq_rep_4": 0.10}
HEALTHY = {"ended_rate": 0.5, "seq_rep_4": 0.12}
LOOPING = {"ended_rate": 0.1, "seq_rep_4": 0.60}


def test_best_is_the_lowest_loss_among_healthy_candidates(tmp_path):
    model = torch.nn.Linear(3, 2)
    best = BestCheckpoint(tmp_path)
    weights = {}
    for step, loss, health in ((2, 1.0, HEALTHY), (4, 0.5, LOOPING), (6, 0.8, HEALTHY), (8, 0.9, HEALTHY)):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.clone()
        best.consider(model, step, {"loss": loss}, health, BASE)
    assert best.step == 6  # step 4 had the lowest loss but loops
    with torch.no_grad():
        model.weight.zero_()
    assert best.restore(model) == 6 and torch.equal(model.weight, weights[6])
    # A resumed run keeps a best found before its checkpoint, and forgets one found after it.
    assert BestCheckpoint(tmp_path, resumed_step=6).step == 6
    assert BestCheckpoint(tmp_path, resumed_step=5).step is None


def test_run_with_select_best_ships_the_selected_step_and_prints_the_table(tmp_path, tiny_model_dir, tiny_data, capsys):  # noqa: F811
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, max_steps=6, eval_every=2, select_best=True,
                      health_prompts=3, health_max_new_tokens=6, eval_max_pairs=0)
    run(cfg)
    run_dir = tmp_path / "runs" / "t"
    record = json.loads((run_dir / "best" / "best.json").read_text())
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    before = next(r for r in evals if r["tag"] == "before")
    after = next(r for r in evals if r["tag"] == "after")
    # Candidates: the periodic evaluations and the last step (tagged "last" when another was chosen).
    candidates = [r for r in evals if r["tag"] in ("periodic", "last")]
    if after["selected_step"] == after["step"]:
        candidates.append(after)
    assert sorted(r["step"] for r in candidates) == [2, 4, 6]
    healthy = [r for r in candidates if r["health_ended_rate"] >= before["health_ended_rate"] - 0.05
               and r["health_seq_rep_4"] <= before["health_seq_rep_4"] + 0.05]
    assert healthy  # best.json exists, so some candidate passed
    expected = min(healthy, key=lambda r: r["loss"])
    assert record["step"] == expected["step"] == after["selected_step"]
    assert after["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # the shipped adapter's figures
    from safetensors.torch import load_file

    shipped = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    best = load_file(str(run_dir / "best" / "adapter_weights.safetensors"))
    lora_a = next(k for k in shipped if "lora_A" in k)
    match = next(k for k in best if k.endswith(lora_a.split("base_model.model.")[-1].replace(".weight", ".default.weight")))
    assert torch.equal(shipped[lora_a], best[match])
    report = (run_dir / "evaluation.md").read_text()
    assert "change [95% CI]" in report and "Generation health" in report
    assert "change [95% CI]" in capsys.readouterr().err  # printed at the end of the run
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "## Evaluation" in card and "seq-rep-4" in card


def test_recipe_file_loads_and_validates():
    recipe = Path(__file__).resolve().parents[1] / "configs" / "hh-recipe.yaml"
    cfg = OrpoConfig.from_file(recipe)
    assert cfg.select_best and cfg.eval_every > 0 and cfg.eval_max_pairs == 0
    assert cfg.health_prompts > 0 and cfg.data == "embedded"
    override = OrpoConfig.from_dict({**OrpoConfig.read_file(recipe), "data": "other.jsonl"})
    assert override.data == "other.jsonl" and override.beta == cfg.beta
