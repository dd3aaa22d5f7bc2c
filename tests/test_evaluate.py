"""Held-out evaluation: batched chunked numbers equal a direct full-logits computation with loss.py;
base vs adapter side by side; scripts/evaluate.py reproduces a training run's own evaluations."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer, random_tokenized_pairs
from peft import LoraConfig, get_peft_model

from qlora_orpo.cli.evaluate import main
from qlora_orpo.config import OrpoConfig
from qlora_orpo.data.collate import TokenizedPair, collate_pairs
from qlora_orpo.evaluation.report import markdown_report
from qlora_orpo.evaluation.scoring import evaluate_base_and_adapter, evaluate_pairs
from qlora_orpo.evaluation.stats import wilson_interval
from qlora_orpo.recipes.evaluate import resolve_eval_config
from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.loss import log_odds, sequence_logps
from qlora_orpo.training.metrics import read_metrics

VOCAB = 97
BETA = 0.2
WORDS = "the quick brown fox jumps over lazy dog hello world capital France Paris bread flour water".split()


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    return random_tokenized_pairs(n, VOCAB, seed, min_length=2)


def lora_model(seed: int = 0):
    model = build_tiny_llama(vocab_size=VOCAB, seed=seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


@torch.no_grad()
def direct_metrics(model, pairs: list[TokenizedPair], beta: float, nll_over_prompt: bool = False) -> dict[str, float]:
    """One pair at a time, full (seq, vocab) logits, loss.py only: the reference evaluate_pairs must match."""
    model.eval()
    chosen, rejected, nll = [], [], []
    for pair in pairs:
        batch = collate_pairs([pair], pad_token_id=0)
        for side, out in ((batch.chosen, chosen), (batch.rejected, rejected)):
            logits = model(input_ids=side.input_ids, attention_mask=side.attention_mask).logits.double()
            out.append(sequence_logps(logits, side.labels))
            if side is batch.chosen:
                scored = side.prompt_labels if nll_over_prompt else side.labels
                nll.append(-sequence_logps(logits, scored))
    chosen, rejected, nll = torch.cat(chosen), torch.cat(rejected), torch.cat(nll)
    ratio = log_odds(chosen) - log_odds(rejected)
    or_loss = -torch.nn.functional.logsigmoid(ratio).mean()
    low, high = wilson_interval(int((ratio > 0).sum()), len(pairs))  # checked against the formula in test_stats
    return {
        "pairs": len(pairs),
        "reward_accuracy": (ratio > 0).double().mean().item(),
        "reward_accuracy_low": low,
        "reward_accuracy_high": high,
        "chosen_logp": chosen.mean().item(),
        "rejected_logp": rejected.mean().item(),
        "log_odds_ratio": ratio.mean().item(),
        "reward_margin": (beta * (chosen - rejected)).mean().item(),
        "nll": nll.mean().item(),
        "or_loss": or_loss.item(),
        "loss": (nll.mean() + beta * or_loss).item(),
    }


def assert_metrics_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-6), key


@pytest.mark.parametrize("nll_over_prompt", [False, True])
def test_evaluate_pairs_equals_direct_full_logits_computation(nll_over_prompt):
    model = lora_model()
    pairs = random_pairs(7)  # batches of 3, 3 and 1: padding and a short last batch
    got = evaluate_pairs(model, pairs, BETA, pad_token_id=0, batch_size=3, chunk_size=4,
                         nll_over_prompt=nll_over_prompt, progress=False)
    assert_metrics_close(got, direct_metrics(model, pairs, BETA, nll_over_prompt))
    assert 0.0 < got["reward_accuracy"] < 1.0  # a random model: the accuracy is not trivially 0 or 1


def test_evaluation_leaves_training_mode_and_gradients_alone():
    model = lora_model()
    model.train()
    evaluate_pairs(model, random_pairs(3), BETA, pad_token_id=0, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_base_and_adapter_side_by_side_on_one_model():
    model = lora_model(seed=3)
    plain_base = build_tiny_llama(vocab_size=VOCAB, seed=3)  # the same base weights, never wrapped
    pairs = random_pairs(5, seed=1)
    result = evaluate_base_and_adapter(model, pairs, BETA, pad_token_id=0, batch_size=2, chunk_size=4, progress=False)
    assert_metrics_close(result["base"], direct_metrics(plain_base, pairs, BETA))
    assert_metrics_close(result["adapter"], direct_metrics(model, pairs, BETA))
    assert result["base"]["nll"] != pytest.approx(result["adapter"]["nll"], rel=1e-3)  # the adapter matters
    # After the side-by-side the adapter is active again.
    assert_metrics_close(evaluate_pairs(model, pairs, BETA, 0, progress=False), result["adapter"])

    alone = evaluate_base_and_adapter(plain_base, pairs, BETA, pad_token_id=0, progress=False)
    assert alone["adapter"] is None
    assert_metrics_close(alone["base"], result["base"])


# ---------------------------------------------------------------------------------------------
# scripts/evaluate.py on a trained tiny run
# ---------------------------------------------------------------------------------------------


def train_tiny_run(tmp_path, **overrides):
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as handle:
        for _ in range(40):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=g)]
            handle.write(json.dumps({"prompt": " ".join(words[:3]), "chosen": "hello world " + " ".join(words[3:6]),
                                     "rejected": "the lazy dog " + " ".join(words[5:8])}) + "\n")
    cfg = OrpoConfig(
        model=str(model_dir), data=str(data), output_dir=str(tmp_path / "runs"), run_name="t", quant="none",
        compute_dtype="float32", device="cpu", max_steps=4, batch_size=2, grad_accum=1, max_length=48,
        max_prompt_length=24, lora_r=4, lora_alpha=8, learning_rate=1e-2, eval_fraction=0.25, eval_max_pairs=6,
        save_every=0, logits_chunk_size=8, beta=0.3, health_prompts=4, health_max_new_tokens=8,
    )
    run(dataclasses.replace(cfg, **overrides))
    return tmp_path / "runs" / "t"


@pytest.fixture
def trained_run(tmp_path):
    return train_tiny_run(tmp_path)


def test_script_reproduces_a_4bit_bfloat16_run_s_evaluation(tmp_path):
    """4-bit base, bfloat16 compute: the run evaluated through the lean LoRA forward (bfloat16 LoRA
    matmuls); the script loads the adapter with the same forward, so its figures are the run's
    (with peft's float32 LoRA path they differed in the fourth digit)."""
    run_dir = train_tiny_run(tmp_path, quant="nf4", compute_dtype="bfloat16", health_prompts=0)
    out = tmp_path / "eval.json"
    assert main(["--adapter", str(run_dir / "adapter"), "--max-pairs", "6", "--json", str(out), "--no-progress",
                 "--health-prompts", "0"]) == 0
    result = json.loads(out.read_text())
    after = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("tag") == "after")
    for key, value in result["adapter"].items():
        if key in after:
            assert value == pytest.approx(after[key], rel=1e-6, abs=1e-7), key


def test_script_reproduces_the_runs_before_and_after_evaluations(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["--adapter", str(trained_run / "adapter"), "--max-pairs", "6", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    records = {r["tag"]: r for r in read_metrics(trained_run / "metrics.jsonl") if r["split"] == "eval"}
    # Settings came from the adapter's card: the same held-out pairs, lengths, beta and base.
    assert result["settings"]["beta"] == 0.3 and result["settings"]["max_length"] == 48
    assert result["pairs"]["evaluated"] == records["after"]["pairs"] == 6
    keep = set(result["base"])
    strip = lambda r: {k: v for k, v in r.items() if k in keep}  # noqa: E731  (no step, tag, health_*)
    # "before" was the base with a fresh (identity) adapter; "after" the trained adapter.
    assert_metrics_close(result["base"], strip(records["before"]))
    assert_metrics_close(result["adapter"], strip(records["after"]))
    # The run's own health figures (greedy, same prompts) are reproduced too.
    for side, tag in (("base", "before"), ("adapter", "after")):
        for key, value in result["health"][side]["metrics"].items():
            assert records[tag][f"health_{key}"] == pytest.approx(value), (side, key)
    table = capsys.readouterr().out
    assert "| metric | base | base + adapter | change [95% CI] |" in table
    assert "reward accuracy" in table and "chosen NLL" in table and "seq-rep-4" in table
    assert "**Prompt 1:**" in table  # replies side by side


def test_script_evaluates_every_held_out_pair_whatever_the_run_capped(trained_run, tmp_path, capsys):
    out = tmp_path / "all.md"
    assert main(["--adapter", str(trained_run / "adapter"), "--json", "-", "--no-progress", "--health-prompts", "2",
                 "--show-replies", "1", "--markdown", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"]["evaluated"] == result["pairs"]["held_out"] > 6  # the run capped its own at 6
    assert result["health"]["base"]["metrics"]["prompts"] == 2
    change = result["change"]
    acc = change["reward_accuracy"]
    assert acc["change"] == pytest.approx(result["adapter"]["reward_accuracy"] - result["base"]["reward_accuracy"])
    assert acc["low"] <= acc["change"] <= acc["high"]
    n = result["pairs"]["evaluated"]
    assert acc["change"] == pytest.approx((change["gained"] - change["lost"]) / n)
    text = out.read_text()
    assert "**Prompt 1:**" in text and "**Prompt 2:**" not in text


def test_script_flags_override_the_adapters_settings(trained_run, tmp_path, capsys):
    assert main(["--adapter", str(trained_run / "adapter"), "--max-pairs", "2", "--beta", "0.5",
                 "--json", "-", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"]["evaluated"] == result["base"]["pairs"] == 2
    assert result["settings"]["beta"] == 0.5


def test_base_alone_and_user_errors(trained_run, tmp_path, capsys):
    model_dir = tmp_path / "tiny-model"
    common = ["--model", str(model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--quant", "none",
              "--compute-dtype", "float32", "--no-progress"]
    assert main([*common, "--eval-fraction", "0.25", "--max-pairs", "3", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] is None and result["base"]["pairs"] == 3
    assert main([*common, "--eval-fraction", "0"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_config_precedence_card_then_file_then_flags(trained_run, tmp_path):
    adapter = trained_run / "adapter"
    assert resolve_eval_config(adapter, None, {}).max_length == 48  # from the card
    config_file = tmp_path / "override.yaml"
    config_file.write_text("max_length: 40\nbeta: 0.7\n")
    from_file = resolve_eval_config(adapter, config_file, {})
    assert (from_file.max_length, from_file.beta, from_file.eval_fraction) == (40, 0.7, 0.25)
    assert resolve_eval_config(adapter, config_file, {"beta": 0.9}).beta == 0.9


def test_markdown_report_without_adapter():
    metrics = {"pairs": 2, "reward_accuracy": 0.5, "log_odds_ratio": 0.1, "reward_margin": 0.01,
               "nll": 1.0, "or_loss": 0.6, "loss": 1.06}
    settings = {"eval_fraction": 0.05, "max_length": 512, "beta": 0.1, "nll_over_prompt": False, "quant": "nf4"}
    text = markdown_report({"settings": settings, "pairs": {"evaluated": 2, "held_out": 9, "data": "x"},
                            "base": metrics, "adapter": None})
    assert "| metric | base |" in text and "| reward accuracy (log-odds w > l) | 0.500 |" in text


def test_report_with_adapter_health_and_a_sweep_row():
    from qlora_orpo.evaluation.report import sweep_table

    base = {"pairs": 100, "reward_accuracy": 0.5, "reward_accuracy_low": 0.4, "reward_accuracy_high": 0.6,
            "log_odds_ratio": 0.0, "reward_margin": 0.0, "chosen_logp": -3.0, "rejected_logp": -3.1,
            "nll": 3.0, "or_loss": 0.7, "loss": 3.07}
    adapter = {**base, "reward_accuracy": 0.62, "nll": 2.9}
    ci = {"change": 0.12, "low": 0.05, "high": 0.19}
    change = {k: dict(ci) for k in ("reward_accuracy", "log_odds_ratio", "reward_margin", "chosen_logp",
                                    "rejected_logp", "nll")} | {"gained": 15, "lost": 3}
    change["nll"] = {"change": -0.1, "low": -0.15, "high": -0.05}
    side = {"metrics": {"prompts": 2, "ended_rate": 0.5, "seq_rep_4": 0.1, "distinct_2": 0.8, "mean_length": 20.0},
            "prompts": ["hi | there", "b"], "replies": [{"ids": [1, 2], "ended": True, "text": "ok"},
                                                      {"ids": [3], "ended": False, "text": ""}]}
    health = {"base": side, "adapter": side, "max_new_tokens": 64, "gate": {"passes": True, "why": "healthy"},
              "change": {"ended_rate": 0.0, "seq_rep_4": 0.0, "distinct_2": 0.0, "mean_length": 0.0,
                         "median_length_ratio": 1.0}}
    settings = {"eval_fraction": 0.1, "max_length": 512, "beta": 0.25, "nll_over_prompt": False, "quant": "nf4"}
    result = {"settings": settings, "pairs": {"evaluated": 100, "held_out": 100, "data": "x"}, "base": base,
              "adapter": adapter, "change": change, "health": health, "selected_step": 80}
    text = markdown_report(result, show_replies=1)
    assert "| reward accuracy (log-odds w > l) | 0.500 [0.400, 0.600] | 0.620 [0.400, 0.600] | +0.120 [+0.050, +0.190] |" in text
    assert "15 pairs turned right, 3 turned wrong" in text
    assert "| seq-rep-4 (mean per reply) | 0.100 | 0.100 | +0.000 |" in text and "passes" in text
    assert "**Prompt 1:** hi | there" in text and "**Prompt 2:**" not in text
    row = sweep_table([("r1", {"learning_rate": 2e-4, "beta": 0.25}, result, 12.5)]).splitlines()[-1]
    assert row.startswith("| r1 | 0.0002 | 0.25 |") and "| 12.5 | 80 | 0.500 -> 0.620 | +0.120 [+0.050, +0.190] |" in row
    assert row.endswith("| 0.80 -> 0.80 | pass |")
