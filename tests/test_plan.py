"""``qlora-orpo plan``: the floor per part, both residual variants, what fits, and the benchmark check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_orpo.cli import main
from qlora_orpo.core.errors import UserError
from qlora_orpo.models import plan as P

# Llama-3-8B's public numbers (its config.json on the hub), written out by hand.
LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
}


@pytest.fixture
def llama3_dir(tmp_path) -> Path:
    (tmp_path / "llama3-8b").mkdir()
    (tmp_path / "llama3-8b" / "config.json").write_text(json.dumps(LLAMA3_8B))
    return tmp_path / "llama3-8b"


def test_llama3_8b_floor_at_2048_tokens_in_both_variants(llama3_dir):
    config, _ = P.read_model_config(str(llama3_dir))
    shape = P.model_shape(config, "x")
    assert shape.total_params == pytest.approx(8.03e9, rel=0.01)
    f32 = P.predict(shape, 2048, variant="float32").floor
    bf16 = P.predict(shape, 2048, variant="bf16").floor
    # The figures the issue states: 9.8 GiB with the float32 residual stream and embeddings, ~6.9 in bf16.
    assert f32.total_bytes / P.GIB == pytest.approx(9.8, abs=0.05)
    assert bf16.total_bytes / P.GIB == pytest.approx(6.9, abs=0.05)
    assert f32.weights_4bit == bf16.weights_4bit and f32.full_precision == 2 * bf16.full_precision


def test_largest_length_and_batch_are_the_edge_of_what_fits(llama3_dir):
    shape = P.model_shape(P.read_model_config(str(llama3_dir))[0], "x")
    budget = 24 * P.GIB
    for variant in P.VARIANTS:
        length = P.largest_length(shape, 1, budget, variant=variant, reserve_gib=0.5)
        assert P.predict(shape, length, 1, variant=variant, reserve_gib=0.5).peak_bytes <= budget
        assert P.predict(shape, length + P.LENGTH_QUANTUM, 1, variant=variant, reserve_gib=0.5).peak_bytes > budget
        batch = P.largest_batch(shape, 2048, budget, variant=variant, reserve_gib=0.5)
        assert P.predict(shape, 2048, batch, variant=variant, reserve_gib=0.5).peak_bytes <= budget
        assert P.predict(shape, 2048, batch + 1, variant=variant, reserve_gib=0.5).peak_bytes > budget
    assert P.largest_length(shape, 1, 4 * P.GIB) == 0  # the 4-bit weights alone do not fit


def test_plan_command_prints_parts_both_variants_and_what_fits(llama3_dir, capsys):
    assert main(["plan", str(llama3_dir), "--max-length", "2048", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "--step split" in out and "float32 residual" in out and "bf16 residual" in out
    for part in ("4-bit weights", "full-precision parameters", "LoRA weights", "optimizer states", "activations",
                 "logits chunk"):
        assert part in out
    assert "| **floor: loaded model + steady step** | **9.84** | **6.91** |" in out
    assert out.count("2048 tokens x batch 1 fits") == 2


def test_hub_ids_go_through_hf_hub_download(llama3_dir, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(llama3_dir / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    config, source = P.read_model_config("meta-llama/Meta-Llama-3-8B")
    assert asked == [("meta-llama/Meta-Llama-3-8B", "config.json")] and config["hidden_size"] == 4096

    def offline(repo_id, filename, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="meta-llama/Meta-Llama-3-8B: cannot fetch config.json"):
        P.read_model_config("meta-llama/Meta-Llama-3-8B")
    with pytest.raises(UserError, match="no config.json"):
        P.read_model_config(str(llama3_dir.parent))


def test_plan_against_the_kept_benchmark_json():
    """The rows of docs/bench_plan_split_trim.json (a `bench --methods split --allocator trim` run)."""
    rows = json.loads((Path(__file__).resolve().parents[1] / "docs" / "bench_plan_split_trim.json").read_text())["rows"]
    config = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}  # SmolLM2-135M
    shape = P.model_shape(config, "SmolLM2-135M")
    assert [r["max_length"] for r in rows] == [512, 1024, 2048]
    for row in rows:
        predicted = P.predict(shape, row["max_length"], 1, variant="float32", chunk_size=64)
        assert predicted.floor.step_bytes / P.MIB == pytest.approx(row["floor_step_mib"], rel=1e-6)
        assert predicted.step_bytes / P.MIB == pytest.approx(row["peak_above_baseline_mib"], rel=0.30)


@pytest.mark.integration
def test_plan_predicts_the_benchmark_within_30_percent_at_512_tokens():
    """One benchmark worker (split, 512 tokens, the embedded model, the benchmark's default allocator) against plan."""
    from qlora_orpo.bench.spec import BenchSpec
    from qlora_orpo.bench.worker import run_in_subprocess

    spec = BenchSpec(method="split", max_length=512, allocator="trim")  # the benchmark's default allocator
    row = run_in_subprocess(None, spec, timeout=300)
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert "error" not in row, row.get("error")
    config, source = P.read_model_config("embedded")
    predicted = P.predict(P.model_shape(config, source), 512, 1, variant="float32", chunk_size=spec.chunk_size)
    measured = row["peak_above_baseline_mib"] * P.MIB
    print(f"plan {predicted.step_bytes / P.MIB:.1f} MiB, benchmark {measured / P.MIB:.1f} MiB")
    assert predicted.step_bytes == pytest.approx(measured, rel=0.30), (predicted.step_bytes / P.MIB, measured / P.MIB)


def test_plan_takes_model_as_a_flag_like_every_other_subcommand(llama3_dir, capsys):
    assert main(["plan", "--model", str(llama3_dir), "--max-length", "2048", "--gpu-memory", "24"]) == 0
    flag_out = capsys.readouterr().out
    assert main(["plan", str(llama3_dir), "--max-length", "2048", "--gpu-memory", "24"]) == 0
    assert capsys.readouterr().out == flag_out and "**9.84**" in flag_out  # the positional alias: same report
    for argv in (["plan"], ["plan", str(llama3_dir), "--model", str(llama3_dir.parent)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "given twice" in capsys.readouterr().err


def test_plan_predicts_each_step_mode_and_what_auto_would_pick(llama3_dir, capsys):
    shape = P.model_shape(P.read_model_config(str(llama3_dir))[0], "x")
    peak = {mode: P.predict_mode(shape, 2048, 1, mode, reserve_gib=0.5).peak_bytes for mode in P.AUTO_MODES}
    # One side alive (split) < both sides (sequential); a shared row at its widest holds 2L - 1 tokens.
    assert peak["split"] < peak["sequential"]
    assert peak["shared"] == pytest.approx(peak["sequential"], rel=0.05)  # as many tokens alive
    assert P.shared_row_tokens(2048) == 4095 and P.shared_row_tokens(512, pack_tokens=4096) == 4096
    # At the worst case a shared row saves no tokens, so auto (step_choice) would not take it there,
    # however much memory there is; the plan says what auto does.
    plenty = max(peak.values()) * 2
    assert P.auto_mode(shape, 2048, 1, plenty, reserve_gib=0.5) == "sequential"
    assert not P.shared_saves_tokens(P.shared_row_tokens(2048), 1, 1, 2048)
    assert P.shared_saves_tokens(300, 1, 1, 256)  # a long shared prompt: 300 tokens in one row against 512
    between = (peak["split"] + min(peak["sequential"], peak["shared"])) // 2
    assert P.auto_mode(shape, 2048, 1, between, reserve_gib=0.5) == "split"
    assert P.auto_mode(shape, 2048, 1, peak["split"] - 1, reserve_gib=0.5) is None
    assert main(["plan", "--model", str(llama3_dir), "--max-length", "2048", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    for mode in P.AUTO_MODES:
        assert f"| --step {mode} |" in out
    assert "--step auto in 24 GiB, float32:" in out
    # The default gradient_checkpointing auto at this size keeps recomputing (an 8B model at 2048 tokens).
    assert "bf16: gradient checkpointing on (auto:" in out and "over 0.5 of" in out
