"""Data-parallel training with two CPU processes (torchrun, gloo) against one process."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config, tiny_data, tiny_model_dir, train_losses  # noqa: F401  (fixtures)

from qlora_orpo.data.sampling import micro_batches
from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.checkpoint import latest_checkpoint
from qlora_orpo.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_gloo_available(), reason="needs torchrun and gloo"
)


def torchrun(tmp_path: Path, cfg, out: Path, *flags: str, nproc: int = 2, sharding: str = "ddp"
             ) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    config = tmp_path / f"config-{out.name}.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    if sharding == "fsdp2":  # what accelerate's FSDP config sets (distributed.sharding_from_env)
        env |= {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(REPO / "tests" / "dist_worker.py"),
               str(config), str(out), *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def check(result: subprocess.CompletedProcess, ok: bool = True) -> None:
    assert (result.returncode == 0) == ok, result.stderr[-3000:]


def test_micro_batches_are_one_global_stream_dealt_out_by_rank(tiny_tokenizer):
    from conftest import random_tokenized_pairs

    pairs = random_tokenized_pairs(10, 300)
    rows = lambda stream, n: [next(stream).rows for _ in range(n)]  # noqa: E731
    single = rows(micro_batches(pairs, 2, 7, 3, 0), 12)  # crosses an epoch boundary (5 per epoch)
    rank0 = rows(micro_batches(pairs, 2, 7, 3, 0, world_size=2, rank=0), 6)
    rank1 = rows(micro_batches(pairs, 2, 7, 3, 0, world_size=2, rank=1), 6)
    assert rank0 == single[0::2] and rank1 == single[1::2]
    three = [rows(micro_batches(pairs, 2, 7, 3, 0, world_size=3, rank=r), 4) for r in range(3)]
    assert [three[i % 3][i // 3] for i in range(12)] == single  # another N: the same stream, re-dealt


def test_two_ranks_step_equals_one_process_over_both_shards(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    """NF4 + LoRA + checkpointing, split step: DDP's averaged step is the single-process step over the union."""
    common = dict(quant="nf4", max_steps=1, save_every=0, step="split", lora_dropout=0.0, eval_fraction=0.0,
                  cpu_allocator="glibc", warmup_ratio=0.0, lr_scheduler="constant")
    two = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="two", grad_accum=2, **common)
    check(torchrun(tmp_path, two, tmp_path / "out-two"))
    rank0 = load_file(str(tmp_path / "out-two" / "rank0-step1.safetensors"))
    rank1 = load_file(str(tmp_path / "out-two" / "rank1-step1.safetensors"))
    # Four backward passes per rank (two micro-batches of the split step), one gradient all-reduce.
    assert int(rank0.pop("__allreduces")) == 1 and int(rank1.pop("__allreduces")) == 1
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # the same averaged gradient, bitwise

    # One process, four micro-batches: exactly the micro-batches the two ranks took between them.
    one = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="one", grad_accum=4, **common)
    import qlora_orpo.training.step as step

    models = []
    real_init = step.OrpoStep.__init__

    def capturing_init(self, model, *args, **kwargs):
        models.append(model)
        real_init(self, model, *args, **kwargs)

    step.OrpoStep.__init__ = capturing_init
    try:
        run(one)
    finally:
        step.OrpoStep.__init__ = real_init
    single = {n: p.detach() for n, p in models[-1].named_parameters() if p.requires_grad}
    initial_b = [n for n in single if "lora_B" in n]
    assert all(single[n].abs().max() > 0 for n in initial_b)  # the step moved the weights (B starts at 0)
    for name in rank0:
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-7, msg=name)

    # The run directory was written once, by rank 0: one record per step, one summary.
    records = read_metrics(tmp_path / "runs" / "two" / "metrics.jsonl")
    assert [r["split"] for r in records] == ["train", "summary"]
    assert records[0]["loss"] == pytest.approx(read_metrics(tmp_path / "runs" / "one" / "metrics.jsonl")[0]["loss"],
                                               rel=1e-5)  # the logged loss is averaged over the ranks
    assert records[0]["tokens"] == read_metrics(tmp_path / "runs" / "one" / "metrics.jsonl")[0]["tokens"]
    assert sorted(p.name for p in (tmp_path / "runs" / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "runs" / "one").iterdir())


def test_resume_under_two_ranks_continues_with_the_same_losses(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    common = dict(max_steps=4, save_every=0, lora_dropout=0.1, eval_fraction=0.0, cpu_allocator="glibc")
    full = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="full", **common)
    check(torchrun(tmp_path, full, tmp_path / "out-full"))
    cut = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="cut", **common)
    check(torchrun(tmp_path, cut, tmp_path / "out-cut", "--stop-after", "2"), ok=False)  # torchrun: exit 1
    run_dir = tmp_path / "runs" / "cut"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"  # Ctrl-C saved once
    shutil.copytree(run_dir, tmp_path / "runs" / "cut-copy")
    check(torchrun(tmp_path, cut, tmp_path / "out-resumed", "--resume"))
    expected, resumed = train_losses(tmp_path / "runs" / "full"), train_losses(run_dir)
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(expected, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}"
    assert int(load_file(str(tmp_path / "out-full" / "rank0-step4.safetensors"))["__allreduces"]) == 4
    resumed_weights = load_file(str(tmp_path / "out-resumed" / "rank1-step4.safetensors"))
    assert int(resumed_weights["__allreduces"]) == 2  # steps 3 and 4 after the resume
    for name, value in load_file(str(tmp_path / "out-full" / "rank1-step4.safetensors")).items():
        if name.startswith("__"):
            continue
        torch.testing.assert_close(resumed_weights[name], value)

    # Another number of ranks: the same checkpoint resumes in one process, re-sharded.
    copy = dataclasses.replace(cut, run_name="cut-copy")
    summary = run(copy, resume=True)
    assert summary["steps"] == 4 and [s for s, _ in train_losses(tmp_path / "runs" / "cut-copy")] == [1, 2, 3, 4]


def test_only_the_last_pass_of_an_optimizer_step_synchronises():
    """Split step, two micro-batches: four backward passes, the last alone outside no_sync."""
    from conftest import random_tokenized_pairs

    from qlora_orpo.bench.tiny import build_tiny_llama
    from qlora_orpo.data.collate import collate_pairs
    from qlora_orpo.training.step import OrpoStep, SideForward

    model = build_tiny_llama(vocab_size=300)
    for p in model.parameters():
        p.requires_grad_(True)
    inside: list[bool] = []  # per backward: was it under no_sync?
    depth = [0]

    class NoSync:
        def __enter__(self):
            depth[0] += 1

        def __exit__(self, *exc):
            depth[0] -= 1

    def backward(loss):
        inside.append(depth[0] > 0)
        loss.backward()

    step = OrpoStep(model, 0.5, "split", 5, backward=backward, forward=SideForward(model, 5), no_sync=NoSync)
    batches = [collate_pairs(random_tokenized_pairs(2, 300, seed=s), 0) for s in range(2)]
    for i, batch in enumerate(batches):
        step(batch, loss_scale=0.5, sync_grads=i == len(batches) - 1)
    assert inside == [True, True, True, False]
    inside.clear()
    OrpoStep(model, 0.5, "sequential", 5, backward=backward, no_sync=NoSync)(batches[0], sync_grads=False)
    assert inside == [True]


def test_accelerate_cpu_launcher_starting_one_process_is_refused(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(REPO / "scripts" / "finetune.py"), "--device", "cpu",
         "--cpu-allocator", "glibc", "--output-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "asked for 2 processes but started one non-distributed process" in result.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_fsdp2_on_a_cpu_mesh_shards_the_4bit_weights_and_matches_ddp(tmp_path, tiny_model_dir):  # noqa: F811
    out = tmp_path / "fsdp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "fsdp_worker.py"),
         str(tiny_model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300,
    )
    check(result)
    shards = json.loads((out / "shards.json").read_text())
    assert shards and all(local * 2 == full for local, full in shards.values())  # each rank holds half
    tensors = load_file(str(out / "grads.safetensors"))
    names = [k.removeprefix("ddp/") for k in tensors if k.startswith("ddp/")]
    assert names and any(tensors[f"ddp/{n}"].abs().max() > 0 for n in names)
    for name in names:
        torch.testing.assert_close(tensors[f"fsdp2/{name}"], tensors[f"ddp/{name}"], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(tensors[f"after/{name}"], tensors[f"ddp_after/{name}"], rtol=1e-5, atol=1e-8)
    # Loaded by rank 0 alone, rank 1 holding a meta skeleton until its shard arrives: the same
    # gradients and the same step (the quant states and buffers came over from rank 0).
    assert json.loads((out / "skeletons.json").read_text()) == [False, True]
    for name in names:
        torch.testing.assert_close(tensors[f"rank0/{name}"], tensors[f"ddp/{name}"], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(tensors[f"rank0_after/{name}"], tensors[f"ddp_after/{name}"], rtol=1e-5, atol=1e-8)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def adapter_weights(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``adapter_dir`` as the normal loader puts them on the base, in this one process."""
    from qlora_orpo.export.adapters import load_adapter
    from qlora_orpo.models.loader import load_base, load_tokenizer

    base = load_base(str(model_dir), "nf4", "cpu", torch.float32)
    model = load_adapter(base, load_tokenizer(str(model_dir)), adapter_dir)  # checks the card's base fingerprint
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Equal to 1e-5 of the tensor's largest value (and of each element's).

    DDP all-reduces the gradients and FSDP2 reduce-scatters them: the same sum to rounding.
    AdamW divides each update by the root of its squared-gradient average, so an element
    whose gradient is near zero moves by a ratio of rounding errors (seen: 2e-5 relative on
    an element 15 times smaller than its tensor's largest, after two steps).
    """
    scale = float(expected.abs().max()) if expected.is_floating_point() and expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=msg)


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x and x.keys() == y.keys(), a.name
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        assert_close_to_scale(y[name], x[name], f"{a.name}: {name}")


def auto_choices(log: str) -> dict[str, int]:
    """``{"shared": 1, "split": 3}`` from the end-of-run line ``step auto (budget 1 MiB): shared 1, split 3``."""
    line = re.search(r"step auto \(budget [\d,]+ MiB\): (.*)", log)  # rank 0's line
    assert line, log[-2000:]
    return {mode: int(n) for mode, n in (part.split() for part in line.group(1).split(", "))}


def test_fsdp2_run_writes_what_ddp_writes_and_its_checkpoints_resume_in_one_process(
    tmp_path, tiny_model_dir, tiny_data  # noqa: F811
):
    """finetune's loop sharded on 2 ranks: checkpoints, evaluation with health and selection, the adapter."""
    # Every other pair's chosen reply long, so micro-batches differ in shape from rank to rank.
    # Under a 4 MiB budget --step auto picks shared for every one of them on both ranks, so the
    # DDP and FSDP2 runs take the same passes and must give the same weights (test below for
    # ranks that choose differently). Under FSDP2 the ranks' choices are agreed each micro-batch.
    data = tmp_path / "varied.jsonl"
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "chosen": r["chosen"] + " hello world" * 8 * (i % 2)}) + "\n"
                            for i, r in enumerate(rows)))
    common = dict(quant="nf4", max_steps=2, save_every=1, eval_every=1, select_best=True, health_prompts=2,
                  health_max_new_tokens=8, lora_dropout=0.0, cpu_allocator="glibc", lr_scheduler="constant",
                  warmup_ratio=0.0, step="auto", memory_budget_mib=4)
    configs = {s: tiny_config(tmp_path, tiny_model_dir, data, run_name=s, **common) for s in ("ddp", "fsdp2")}
    output = {}
    for sharding, cfg in configs.items():
        result = torchrun(tmp_path, cfg, tmp_path / f"out-{sharding}", sharding=sharding)
        check(result)
        output[sharding] = result.stdout + result.stderr
    ddp_modes, fsdp_modes = auto_choices(output["ddp"]), auto_choices(output["fsdp2"])
    assert ddp_modes == fsdp_modes == {"shared": 4}
    # Rank 0 alone read the checkpoint; rank 1 built a skeleton and got its shard from rank 0.
    assert "loaded by rank 0 alone, sharded from it (fsdp2)" in output["fsdp2"]
    assert "loaded by rank 0 alone" not in output["ddp"]
    ddp, fsdp = tmp_path / "runs" / "ddp", tmp_path / "runs" / "fsdp2"
    assert files_under(fsdp) == files_under(ddp)
    assert (fsdp / "best" / "best.json").is_file() and (fsdp / "evaluation.json").is_file()

    # Written once, by rank 0: the same records in the same order, with the same figures.
    records = {s: read_metrics(tmp_path / "runs" / s / "metrics.jsonl") for s in configs}
    assert [(r["split"], r.get("tag"), r["step"]) for r in records["fsdp2"]] == [
        (r["split"], r.get("tag"), r["step"]) for r in records["ddp"]]
    evals = [r for r in records["fsdp2"] if r["split"] == "eval"]
    assert [r["tag"] for r in evals] == ["before", "periodic", "after"] and all("health_seq_rep_4" in r for r in evals)
    for a, b in zip(records["ddp"], records["fsdp2"], strict=True):
        for key in ("loss", "reward_margin", "health_ended_rate", "health_seq_rep_4", "health_distinct_2"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["split"], a["step"], key)

    # The shipped adapter, loaded in one process by the normal loader: DDP's weights.
    shipped = {s: adapter_weights(tiny_model_dir, tmp_path / "runs" / s / "adapter") for s in configs}
    assert shipped["ddp"] and any(v.abs().max() > 0 for n, v in shipped["ddp"].items() if "lora_B" in n)
    assert shipped["fsdp2"].keys() == shipped["ddp"].keys()
    for name, value in shipped["ddp"].items():
        assert_close_to_scale(shipped["fsdp2"][name], value, name)

    # Checkpoints in the single-process format: the same files, tensors and records as DDP's.
    for step in ("step-000001", "step-000002"):
        a, b = ddp / "checkpoints" / step, fsdp / "checkpoints" / step
        assert files_under(b) == files_under(a)
        for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            assert_same_tensors(a / name, b / name)
        state_a, state_b = (json.loads((c / "state.json").read_text()) for c in (a, b))
        for key in ("train_state", "optimizer", "scheduler"):
            assert state_b[key] == state_a[key], key  # parameter-indexed optimizer groups, as one process writes
    assert_same_tensors(ddp / "best" / "adapter_weights.safetensors", fsdp / "best" / "adapter_weights.safetensors")

    # Either checkpoint resumes in one process, to the same weights and optimizer state after one more step.
    for cfg in configs.values():
        assert run(cfg, resume=True, overrides={"max_steps": 3})["steps"] == 3
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(ddp / "checkpoints" / "step-000003" / name, fsdp / "checkpoints" / "step-000003" / name)
    assert train_losses(fsdp)[-1][1] == pytest.approx(train_losses(ddp)[-1][1], rel=1e-5)


def test_fsdp2_ctrl_c_stops_every_rank_together_and_the_resume_gives_the_same_losses(
    tmp_path, tiny_model_dir, tiny_data  # noqa: F811
):
    """torchrun hands SIGINT to each rank at its own moment; all stop at one point, save, and resume sharded."""
    common = dict(quant="nf4", max_steps=10, save_every=0, lora_dropout=0.1, eval_fraction=0.0, cpu_allocator="glibc")
    full = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="full", **common)
    check(torchrun(tmp_path, full, tmp_path / "out-full", sharding="fsdp2"))
    cut = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="cut", **common)
    result = torchrun(tmp_path, cut, tmp_path / "out-cut", "--sigint-at", "2", sharding="fsdp2")
    check(result, ok=False)
    run_dir = tmp_path / "runs" / "cut"
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None, result.stderr[-3000:]
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert 2 <= stopped < 10 and "interrupted: saved" in result.stdout + result.stderr
    for rank in (0, 1):  # every rank's last completed step is the checkpoint's
        dumps = [int(p.stem.partition("-step")[2]) for p in (tmp_path / "out-cut").glob(f"rank{rank}-step*")]
        assert max(dumps) == stopped, rank
    check(torchrun(tmp_path, cut, tmp_path / "out-resumed", "--resume", sharding="fsdp2"))
    expected, resumed = train_losses(tmp_path / "runs" / "full"), train_losses(run_dir)
    assert [s for s, _ in resumed] == list(range(1, 11))
    for (step, a), (_, b) in zip(expected, resumed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}"
    for name, value in load_file(str(tmp_path / "out-full" / "rank1-step10.safetensors")).items():
        torch.testing.assert_close(load_file(str(tmp_path / "out-resumed" / "rank1-step10.safetensors"))[name], value)


def test_fsdp2_refuses_export_before_writing_anything(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, quant="nf4", export="gguf", cpu_allocator="glibc")
    result = torchrun(tmp_path, cfg, tmp_path / "out", sharding="fsdp2")
    check(result, ok=False)
    assert "--export gguf: merging needs the whole base in one process" in result.stderr
    assert "qlora-orpo export --adapter RUN_DIR/adapter --out OUT --format gguf" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_float16_loss_scaling_is_refused_when_sharded_only():
    from qlora_orpo.core.errors import UserError
    from qlora_orpo.training.distributed import Dist

    with pytest.raises(UserError, match="use --compute-dtype bfloat16"):
        Dist(world_size=2, sharding="fsdp2").check_loss_scaling(True)
    Dist(world_size=2, sharding="fsdp2").check_loss_scaling(False)
    Dist(world_size=2, sharding="ddp").check_loss_scaling(True)
    Dist(world_size=1, sharding="fsdp2").check_loss_scaling(True)  # one process: nothing is sharded


def test_on_paper_scaling_shards_memory_under_fsdp2_only():
    from qlora_orpo.bench.scaling import LLAMA_70B, estimate

    ddp = [estimate(LLAMA_70B, "ddp", g) for g in (1, 2, 4, 8)]
    fsdp = [estimate(LLAMA_70B, "fsdp2", g) for g in (1, 2, 4, 8)]
    assert len({e.memory_bytes for e in ddp}) == 1  # every rank holds the whole model
    assert all(a.memory_bytes > b.memory_bytes for a, b in zip(fsdp, fsdp[1:], strict=False))
    assert fsdp[1].memory_bytes < ddp[1].memory_bytes and fsdp[1].comm_s > ddp[1].comm_s
    assert all(a.step_s > b.step_s for a, b in zip(ddp, ddp[1:], strict=False))
