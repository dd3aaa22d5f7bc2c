"""The base model's evaluation is cached: a second run skips the base's forwards and replies, same table."""

from __future__ import annotations

import json

import pytest
from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.evaluation import base_cache, run_evaluator


@pytest.fixture
def counted(monkeypatch):
    """Counts of the evaluator's scoring passes and health generations (each a forward of every pair/prompt)."""
    calls = {"scores": 0, "health": 0}
    score_pairs, generation_health = run_evaluator.score_pairs, run_evaluator.generation_health

    def scores(*args, **kwargs):
        calls["scores"] += 1
        return score_pairs(*args, **kwargs)

    def health(*args, **kwargs):
        calls["health"] += 1
        return generation_health(*args, **kwargs)

    monkeypatch.setattr(run_evaluator, "score_pairs", scores)
    monkeypatch.setattr(run_evaluator, "generation_health", health)
    return calls


def test_a_second_run_reuses_the_base_evaluation_and_gives_the_same_table(tmp_path, counted, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))

    def train(name: str, *extra: str) -> dict:
        before = dict(counted)
        assert main(["train", *train_flags(model, data, tmp_path / "runs", name), "--max-steps", "1",
                     "--save-every", "0", "--eval-fraction", "0.3", "--health-prompts", "2",
                     "--health-max-new-tokens", "4", *extra]) == 0
        result = json.loads((tmp_path / "runs" / name / "evaluation.json").read_text())
        return {"calls": {k: counted[k] - before[k] for k in counted}, "result": result,
                "log": capsys.readouterr().err}

    first = train("first")
    assert first["calls"] == {"scores": 2, "health": 2}  # before (= the base) and after
    assert len(list(base_cache.cache_dir().glob("*.json"))) == 1
    second = train("second")
    assert second["calls"] == {"scores": 1, "health": 1}  # after only: the base came from the cache
    assert "come from the cache" in second["log"] and "come from the cache" not in first["log"]
    for key in ("base", "adapter", "change"):
        assert second["result"][key] == first["result"][key]
    assert second["result"]["health"] == first["result"]["health"]
    uncached = train("third", "--no-eval-cache")
    assert uncached["calls"] == {"scores": 2, "health": 2} and uncached["result"]["base"] == first["result"]["base"]
    other = train("fourth", "--nll-over-prompt")  # another setting that changes the scores: a miss
    assert other["calls"] == {"scores": 2, "health": 2}
    assert len(list(base_cache.cache_dir().glob("*.json"))) == 2


def test_an_unreadable_or_foreign_entry_is_a_miss(tmp_path):
    base_cache.cache_dir().mkdir(parents=True, exist_ok=True)
    (base_cache.cache_dir() / "abc.json").write_text("{not json")
    assert base_cache.load("abc") is None
    (base_cache.cache_dir() / "def.json").write_text(json.dumps({"key": "other", "scores": {}}))
    assert base_cache.load("def") is None
