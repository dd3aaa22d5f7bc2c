"""The benchmark and the analytic floor and FLOPs: exact parameter counts, the FLOPs of a step by hand,
the fixed-length pair, equal losses across TRL / joint / split in one process, the workers' allocator
environments, and ``bench_orpo.py --quick`` without trl installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from peft import LoraConfig, get_peft_model

from qlora_orpo.bench.flops import roofline_seconds, step_flops
from qlora_orpo.bench.report import markdown_table, plot_memory
from qlora_orpo.bench.spec import BenchSpec, fixed_pair, plan, prompt_length
from qlora_orpo.bench.tiny import build_tiny_model_dir
from qlora_orpo.bench.trl_adapter import TRL_MISSING
from qlora_orpo.bench.worker import run_in_subprocess, run_worker, worker_env
from qlora_orpo.models.floor import ModelShape, memory_floor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_orpo.py"
SMOLLM2_CONFIG = {  # the embedded model's config.json (the sizes that matter)
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
}


# ---------------------------------------------------------------------------------------------
# bench/floor.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_floor_parameter_counts_equal_the_model_and_peft(tie):
    model = build_tiny_llama(vocab_size=101, tie=tie)
    shape = ModelShape.from_config(model.config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    assert shape.quantised_params == linear
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert shape.lora_params(4) == trainable


def test_floor_of_the_embedded_model():
    shape = ModelShape.from_config(SMOLLM2_CONFIG)
    assert shape.total_params == 134_515_008  # as tests/test_model.py measures on the loaded model
    assert shape.lora_params(16) == 4_884_480
    floor = memory_floor(shape, 256)
    mib = floor.as_mib()
    assert mib["weights_4bit"] == pytest.approx(50.625)  # 106,168,320 weights / 2
    assert mib["quant_stats"] == pytest.approx(1.8249, abs=1e-4)  # measured on the loaded NF4 model
    assert mib["full_precision"] == pytest.approx(108.13, abs=0.01)  # float32 embedding + norms
    assert mib["optimizer_states"] == pytest.approx(2 * mib["lora_grads"]) == pytest.approx(2 * mib["lora_weights"])
    # The parts' lifetimes: the backward (gradients of the first side held, all boundaries, the
    # larger of one layer and one logits chunk) outlasts the first AdamW step here.
    assert floor.backward_bytes == floor.lora_grads + floor.boundary_activations + floor.logits_chunk
    assert floor.step_bytes == floor.backward_bytes > floor.optimizer_bytes
    assert mib["step"] == pytest.approx(84.6, abs=0.05)
    assert floor.steady_step_bytes == floor.optimizer_states + floor.backward_bytes
    assert floor.inventory_bytes > floor.steady_step_bytes > floor.step_bytes
    assert floor.total_bytes == floor.resident_bytes + floor.steady_step_bytes
    # The step part grows with the sequence, the resident part does not.
    longer = memory_floor(shape, 2048)
    assert longer.resident_bytes == floor.resident_bytes
    assert longer.boundary_activations == 8 * floor.boundary_activations
    assert longer.layer_activations > longer.logits_chunk  # at 2048 one layer outweighs one chunk
    assert longer.step_bytes > floor.step_bytes
    # Holding both sides at once costs more than holding the gradients, once sequences are long.
    assert memory_floor(shape, 1024, sequences=2).step_bytes > memory_floor(shape, 1024).step_bytes
    assert "| **step** |" in floor.markdown()


def test_floor_4bit_weights_and_statistics_equal_bitsandbytes_own():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import quantize_4bit

    model = build_tiny_llama(vocab_size=101, hidden=128, layers=1)
    shape = ModelShape.from_config(model.config)
    weights = stats = 0
    for module in model.model.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            packed, state = quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
            weights += packed.numel() * packed.element_size()
            tensors = [state.absmax, state.code, state.state2.absmax, state.state2.code]
            stats += sum(t.numel() * t.element_size() for t in tensors)
    floor = memory_floor(shape, 16)
    assert (floor.weights_4bit, floor.quant_stats) == (weights, stats)


# ---------------------------------------------------------------------------------------------
# bench/flops.py
# ---------------------------------------------------------------------------------------------

TINY_SHAPE = ModelShape(hidden=8, layers=1, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10,
                        tied_embeddings=True)


def test_step_flops_by_hand():
    """One layer, H=8, 2 heads and 1 key/value head of width 4 (K=4), I=16, V=10; S=4 tokens, r=2."""
    flops = step_flops(TINY_SHAPE, seq_len=4, lora_r=2, method="split")
    # in x out of q, k, v, o, gate, up, down: 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576
    assert flops.linear == 2 * 4 * 576 == 4608
    # in + out of the same seven: 16 + 12 + 12 + 16 + 24 + 24 + 24 = 128; times r=2, 2 FLOPs, 4 tokens
    assert flops.lora == 2 * 4 * 2 * 128 == 2048
    # causal attention: 10 (query, key) pairs for 4 tokens; QK^T and PV each 2 * 2 heads * 4 wide per pair
    assert flops.attention == 2 * (2 * 2 * 4) * 10 == 320
    # lm_head on the 3 predicted positions: 2 * 3 * 8 * 10
    assert flops.lm_head == 480
    forward = 4608 + 2048 + 320 + 480  # 7456
    backward = 4608 + 2 * 2048 + 2 * 320 + 480  # 9824: input grads of the base, both grads of LoRA
    assert (flops.forward, flops.backward) == (forward, backward)
    assert flops.total == 5 * forward + 2 * backward == 56928  # extra no-grad forward, recompute, backward
    joint = step_flops(TINY_SHAPE, seq_len=4, lora_r=2, method="joint")
    assert joint.total == 4 * forward + 2 * backward == 49472
    # Adapting only q and v: LoRA in + out = 16 + 12 = 28.
    assert step_flops(TINY_SHAPE, 4, 2, ["q_proj", "v_proj"]).lora == 2 * 4 * 2 * 28
    assert step_flops(TINY_SHAPE, 4, 2, scored=1).lm_head == 2 * 1 * 8 * 10
    assert roofline_seconds(flops.total, 56928.0 / 2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="LoRA targets"):
        step_flops(TINY_SHAPE, 4, 2, ["lm_head"])


def test_step_flops_linear_part_equals_torch_flop_counter():
    """The linear and lm_head terms against torch's own count of one forward of a real tiny Llama."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_tiny_llama(vocab_size=101, hidden=64, layers=2).eval()
    shape = ModelShape.from_config(model.config)
    seq = 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(3, 101, (1, seq)))
    mm = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    flops = step_flops(shape, seq, lora_r=0, scored=seq)  # transformers' lm_head runs on every position
    assert mm == flops.layers * flops.linear + flops.lm_head


# ---------------------------------------------------------------------------------------------
# bench/spec.py, bench/worker.py, bench/report.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [16, 64])
def test_fixed_pair_has_exactly_max_length_tokens_on_each_side(max_length):
    tokenizer = build_tokenizer()
    pair = fixed_pair(tokenizer, max_length)
    assert len(pair.prompt_ids) == prompt_length(max_length)
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == max_length
    assert len(pair.prompt_ids) + len(pair.rejected_ids) == max_length
    assert pair.chosen_ids != pair.rejected_ids
    # The prompt still ends where the assistant starts speaking.
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert list(pair.prompt_ids[-len(header):]) == header
    assert fixed_pair(tokenizer, max_length) == pair  # the same ids for every configuration


def test_spec_validation_and_plan():
    with pytest.raises(ValueError, match="method"):
        BenchSpec(method="fast", max_length=64)
    with pytest.raises(ValueError, match="allocator"):
        BenchSpec(method="split", max_length=64, allocator="tcmalloc")
    specs = plan([32, 64], ["trl", "split"], ["glibc", "trim"], BenchSpec(method="split", max_length=8))
    assert [(s.allocator, s.max_length, s.method) for s in specs][:3] == [
        ("glibc", 32, "trl"), ("glibc", 32, "split"), ("glibc", 64, "trl")]
    assert len(specs) == 8
    cfg = specs[0].config()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.nll_over_prompt) == (16, 32, 0.0, True)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("bench") / "tiny")


def test_one_step_of_trl_joint_and_split_give_the_same_loss(tiny_model_dir):
    rows = {}
    for method in ("trl", "joint", "split"):
        spec = BenchSpec(method=method, max_length=32, model=str(tiny_model_dir), compute_dtype="float32",
                         allocator="glibc", chunk_size=8, steps=2)
        rows[method] = run_worker(spec)
    for method, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["tokens"] == 64 and row["pairs"] == 1 and row["quant"] == "nf4"
        assert row["peak_above_baseline_mib"] >= 0 and row["peak_mib"] >= row["baseline_mib"]
        assert row["floor_step_mib"] > 0 and row["floor_ratio"] == pytest.approx(
            row["peak_above_baseline_mib"] / row["floor_step_mib"])
        assert len(row["seconds_per_step"]) == 2 and row["seconds_per_pair"] == pytest.approx(row["seconds_per_step"][1])
        assert row["losses"][1] != row["losses"][0], method  # the optimizer step changed the adapter
        assert row["matmul_gflops"] > 0 and row["roofline_s"] > 0
        assert row["roofline_s"] == pytest.approx(row["step_gflop"] / row["matmul_gflops"])
        assert row["roofline_ratio"] == pytest.approx(row["seconds_per_pair"] / row["roofline_s"])
    # split pays one more no-grad forward than joint for the same pair.
    assert rows["split"]["step_gflop"] > rows["joint"]["step_gflop"] == rows["trl"]["step_gflop"]
    assert rows["joint"]["loss"] == pytest.approx(rows["trl"]["loss"], rel=1e-5)
    assert rows["split"]["loss"] == pytest.approx(rows["trl"]["loss"], rel=1e-5)
    assert rows["split"]["nll"] == pytest.approx(rows["trl"]["nll"], rel=1e-5)
    assert rows["split"]["or_loss"] == pytest.approx(rows["trl"]["or_loss"], rel=1e-5)
    # After one identical AdamW step, the second losses still agree (same gradients).
    assert rows["split"]["losses"][1] == pytest.approx(rows["trl"]["losses"][1], rel=1e-4)


def test_worker_env_preloads_the_allocator_and_its_options(monkeypatch, tmp_path):
    from qlora_orpo.models import memory

    library = tmp_path / "libmimalloc.so"
    library.write_bytes(b"\x7fELF")
    monkeypatch.setenv("MIMALLOC_PATH", str(library))
    monkeypatch.setattr(memory, "MIMALLOC_ENV", {"MIMALLOC_PURGE_DELAY": "0"})
    monkeypatch.setattr("qlora_orpo.bench.worker.MIMALLOC_ENV", memory.MIMALLOC_ENV)
    caller = {"PATH": "/bin", "LD_PRELOAD": "libother.so", "MIMALLOC_VERBOSE": "1", "MIMALLOC_PATH": str(library)}
    tuned = worker_env(BenchSpec(method="split", max_length=32, allocator="mimalloc"), caller)
    assert tuned["LD_PRELOAD"] == f"{library}:libother.so"
    assert tuned["MIMALLOC_PURGE_DELAY"] == "0" and tuned["MIMALLOC_VERBOSE"] == "1"
    default = worker_env(BenchSpec(method="split", max_length=32, allocator="mimalloc-default"), caller)
    assert default["LD_PRELOAD"] == f"{library}:libother.so"
    assert not {k for k in default if k.startswith("MIMALLOC_")} - {"MIMALLOC_PATH"}  # the library's defaults
    assert worker_env(BenchSpec(method="split", max_length=32, allocator="trim"), caller) == caller
    assert BenchSpec(method="split", max_length=32, allocator="mimalloc-default").config().cpu_allocator == "glibc"
    monkeypatch.setenv("MIMALLOC_PATH", str(tmp_path / "absent.so"))
    assert "cmeel-mimalloc" in worker_env(BenchSpec(method="split", max_length=32, allocator="mimalloc"), caller)


def test_missing_jemalloc_is_skipped_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setenv("JEMALLOC_PATH", str(tmp_path / "no-such-lib.so"))
    row = run_in_subprocess(SCRIPT, BenchSpec(method="split", max_length=32, allocator="jemalloc"))
    assert row["skipped"].startswith("libjemalloc.so.2 not found")


def test_report_table_and_plot(tmp_path):
    measured = dict(allocator="trim", device="cpu", peak_above_baseline_mib=150.0, floor_step_mib=100.0,
                    floor_ratio=1.5, seconds_per_pair=2.0, tokens_per_s=256.0, loss=1.5, roofline_s=0.25,
                    roofline_ratio=8.0)
    rows = [
        {"method": "trl", "max_length": 256, "allocator": "trim", "skipped": TRL_MISSING},
        {**measured, "method": "split", "max_length": 256},
        {**measured, "method": "split", "max_length": 512, "peak_above_baseline_mib": 180.0, "floor_step_mib": 130.0},
        {"method": "joint", "max_length": 512, "allocator": "trim", "error": "worker exited with -9: Killed"},
    ]
    table = markdown_table(rows)
    assert "| trl | 256 | trim | skipped: trl is not installed" in table
    assert "| split | 256 | trim | 150 | 100 | 1.5x | 2.00 | 0.25 | 8.0x | 256 | 1.500000 |" in table
    assert "| roofline s | time/roofline |" in table.splitlines()[0]
    # Every line has as many cells as the header, skipped and failed ones included.
    assert len({line.count("|") for line in table.splitlines()}) == 1
    assert "failed: worker exited with -9: Killed" in table
    png = plot_memory(rows, tmp_path / "memory.png")
    assert png is not None and png.read_bytes().startswith(b"\x89PNG")
    assert plot_memory(rows[:1], tmp_path / "none.png") is None


def test_quick_benchmark_runs_without_trl_and_says_so(tmp_path):
    """The script end to end, with ``import trl`` failing in the parent and in every worker."""
    blocker = tmp_path / "no-trl"
    (blocker / "trl").mkdir(parents=True)
    (blocker / "trl" / "__init__.py").write_text("raise ImportError('trl hidden by test_bench')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--lengths", "32", "--methods", "trl,split", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trl is not installed" in done.stderr and "skipped" in done.stderr
    results = json.loads((out / "results.json").read_text())
    trl_row, split_row = results["rows"]
    assert trl_row == {"method": "trl", "max_length": 32, "allocator": "trim", "skipped": TRL_MISSING}
    assert split_row["method"] == "split" and split_row["tokens"] == 64 and split_row["loss"] > 0
    assert results["settings"]["quick"] is True
    assert "| trl | 32 | trim | skipped: trl is not installed" in done.stdout
    assert (out / "memory_vs_length.png").stat().st_size > 0
    assert (out / "results.md").read_text().startswith("| method |")


def test_natural_benchmark_trains_the_same_pairs_with_trl_and_ours(tiny_model_dir):
    """Each tool's own trainer, in its own process, on natural-length pairs: every row has per-step times."""
    from qlora_orpo.bench.natural import NaturalSpec, markdown
    from qlora_orpo.bench.natural import run_in_subprocess as run_natural

    rows = [run_natural(NaturalSpec(method=m, device="cpu", max_length=64, steps=2, pairs_per_step=2, model=str(tiny_model_dir)),
                        timeout=600) for m in ("trl", "sequential", "shared-packed-nogc")]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["pairs"] == 4 and len(row["step_seconds"]) == 2 and row["seconds_per_step"] > 0
    table = markdown(rows)
    assert "| 64 | trl |" in table and "1.00x" in table and "| 64 | shared-packed-nogc |" in table


def test_natural_benchmark_trains_both_tools_on_the_chosen_device(monkeypatch, tmp_path):
    """--device reaches both tools' workers (TRL's ran on the CPU on a GPU machine before), and a
    GPU run's table reports the GPU's peak rather than the host's RSS."""
    import qlora_orpo.cli.bench as cli_bench
    from qlora_orpo.bench.natural import markdown

    specs = []

    def fake_run(spec, timeout=None):
        specs.append(spec)
        return {"method": spec.method, "max_length": spec.max_length, "seconds_per_step": 1.0, "first_step_s": 1.0,
                "tokens_per_s": 10.0, "peak_rss_mib": 900.0}

    monkeypatch.setattr(cli_bench, "run_in_subprocess", fake_run)
    assert cli_bench.main(["--natural", "trl,auto", "--lengths", "64", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert [s.device for s in specs] == ["cpu", "cpu"]
    specs.clear()
    cli_bench.main(["--natural", "auto", "--lengths", "64", "--device", "auto", "--out", str(tmp_path)])
    assert specs[0].device == ("cuda" if torch.cuda.is_available() else "cpu")

    rows = [{"method": m, "max_length": 64, "seconds_per_step": s, "first_step_s": s, "tokens_per_s": 1.0,
             "peak_rss_mib": 2500.0, "peak_gpu_allocated_mib": g} for m, s, g in (("trl", 2.0, 700.0), ("auto", 1.0, 300.0))]
    table = markdown(rows)
    assert "peak GPU MiB (allocated)" in table and "| 300 |" in table and "2500" not in table
    assert "peak RSS MiB" in markdown([{k: v for k, v in r.items() if k != "peak_gpu_allocated_mib"} for r in rows])


def test_natural_methods_set_our_checkpointing_as_named(tmp_path):
    """-nogc turns it off, the step-mode names keep it on (as TRL's defaults), 'defaults' leaves it to auto."""
    from qlora_orpo.bench.natural import NaturalSpec, ours_config

    def setting(method):
        return ours_config(NaturalSpec(method=method, device="cpu"), tmp_path / "d.jsonl", tmp_path).gradient_checkpointing

    assert (setting("auto"), setting("auto-nogc"), setting("shared-packed-nogc"), setting("defaults")) == (
        "on", "off", "off", "auto")
    assert ours_config(NaturalSpec(method="defaults", device="cpu"), tmp_path / "d.jsonl", tmp_path).step == "auto"
