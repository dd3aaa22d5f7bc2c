"""Two CPU ranks (torchrun, gloo) where one rank alone decides: the run directory's lock, and the
number of optimizer steps in epochs mode (issue 20)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny_config, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from qlora_orpo.core.runlock import RunLock
from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_gloo_available(), reason="needs torchrun and gloo"
)

# One rank: trains the config (JSON), prints a refusal with its rank and exits 2.
WORKER = """
import json, os, sys
from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import UserError
from qlora_orpo.recipes.finetune import run
try:
    run(OrpoConfig(**json.load(open(sys.argv[1]))))
except UserError as exc:
    print(f"rank {os.environ['RANK']} refused: {exc}", flush=True)
    sys.exit(2)
"""


def torchrun(tmp_path: Path, cfg) -> subprocess.CompletedProcess:
    config, worker = tmp_path / f"{cfg.run_name}.json", tmp_path / "worker.py"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    worker.write_text(WORKER)
    # A short collective timeout: a rank left waiting for rank 0 fails in a minute, not in 4 hours.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QLORA_ORPO_COLLECTIVE_TIMEOUT_S": "60"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(worker), str(config)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_lock_refused_to_rank_0_reaches_every_rank(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    cfg = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="held", cpu_allocator="glibc")
    run_dir = tmp_path / "runs" / "held"
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):  # another run trains in this directory
        result = torchrun(tmp_path, cfg)
    assert result.returncode != 0
    for rank in (0, 1):  # rank 1 heard rank 0's answer instead of waiting for it in a barrier
        assert f"rank {rank} refused: {run_dir}: another run is training in this directory" in result.stdout, \
            result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written


def test_epochs_mode_under_two_ranks_trains_the_requested_epochs(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    """One epoch over 40 pairs, 4 per optimizer step in either layout (2 ranks x 2, or 1 process x 2 x 2):
    the same 10 steps and the same tokens, each pair once, not once per rank."""
    common = dict(max_steps=0, epochs=1, batch_size=2, save_every=0, eval_fraction=0.0, lora_dropout=0.0,
                  cpu_allocator="glibc", health_prompts=0)
    two = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="two", grad_accum=1, **common)
    result = torchrun(tmp_path, two)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tiny_config(tmp_path, tiny_model_dir, tiny_data, run_name="one", grad_accum=2, **common)
    run(one)
    summaries = {name: [r for r in read_metrics(tmp_path / "runs" / name / "metrics.jsonl")
                        if r["split"] == "summary"][-1] for name in ("one", "two")}
    assert summaries["two"]["steps"] == summaries["one"]["steps"] == 10
    assert summaries["two"]["tokens"] == summaries["one"]["tokens"] > 0
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 11))
