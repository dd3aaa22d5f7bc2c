"""Fault injection (issue 20): a run killed with SIGKILL at the worst moments, or out of disk space,
resumes to the adapter an uninterrupted run ends with, bit for bit, and leaves no debris.

Each case trains the tiny Llama of ``test_train.py`` (6 steps, a checkpoint and an evaluation
every 2 steps, LoRA dropout on so that the RNG state matters) in a child process that kills
itself at one point, then resumes in this process and compares every tensor of the final
adapter with the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from safetensors.torch import load_file
from test_train import WORDS, tiny_config

from qlora_orpo.recipes.finetune import run
from qlora_orpo.training.checkpoint import latest_checkpoint
from qlora_orpo.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# The child: trains cfg (JSON) and kills itself with SIGKILL at ``point``; "full-disk" instead
# limits the size of any file it writes (RLIMIT_FSIZE) from the step-4 checkpoint on, through
# the CLI, which must answer in one line.
CHILD = r"""
import json, os, resource, signal, sys
from pathlib import Path
cfg_values, point = json.loads(sys.argv[1]), sys.argv[2]
import qlora_orpo.training.checkpoint as C
from qlora_orpo.evaluation.run_evaluator import RunEvaluator
from qlora_orpo.training.metrics import JsonlSink
from qlora_orpo.training.step import OrpoStep

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save_file, real_write_text, real_save = C.save_file, C.atomic_write_text, C.save_checkpoint
def save_file(tensors, filename, *args, **kwargs):
    if point == "inside-checkpoint-write" and "step-000004" in filename and filename.endswith("optimizer.safetensors"):
        die()
    return real_save_file(tensors, filename, *args, **kwargs)
def atomic_write_text(path, text):
    if point == "before-the-record" and path.name == "state.json" and "step-000004" in str(path):
        die()
    if point == "before-the-pointer" and path.name == "latest" and "step-000004" in text:
        die()
    return real_write_text(path, text)
def save_checkpoint(run_dir, model, optimizer, scheduler, state, *args, **kwargs):
    if point == "full-disk" and state.step >= 4:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real_save(run_dir, model, optimizer, scheduler, state, *args, **kwargs)
C.save_file, C.atomic_write_text, C.save_checkpoint = save_file, atomic_write_text, save_checkpoint

real_periodic = RunEvaluator.periodic
def periodic(self, step):
    if point == "during-evaluation" and step == 4:
        die()
    return real_periodic(self, step)
RunEvaluator.periodic = periodic

calls = [0]
real_call = OrpoStep.__call__
def call(self, *args, **kwargs):
    calls[0] += 1
    if point == "mid-accumulation" and calls[0] == 4 * 2 + 2:  # step 5, its 2nd micro-batch
        die()
    return real_call(self, *args, **kwargs)
OrpoStep.__call__ = call

real_write = JsonlSink.write
def write(self, record):
    if point == "mid-metrics-line" and record.get("split") == "train" and record.get("step") == 5:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record)[:20])  # half a line, then the kill
        die()
    return real_write(self, record)
JsonlSink.write = write

if point == "full-disk":
    from qlora_orpo.config import OrpoConfig
    from qlora_orpo.cli import main
    config = Path(cfg_values["output_dir"]).parent / "child-config.yaml"
    OrpoConfig(**cfg_values).to_file(config)
    sys.exit(main(["train", "--config", str(config)]))
from qlora_orpo.config import OrpoConfig
from qlora_orpo.recipes.finetune import run
run(OrpoConfig(**cfg_values))
"""

POINTS = ["inside-checkpoint-write", "before-the-record", "before-the-pointer", "during-evaluation",
          "mid-accumulation", "mid-metrics-line"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model and data of test_train.py, and the adapter of an uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = build_tokenizer(chat_template=True)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "tiny-model")
    tokenizer.save_pretrained(root / "tiny-model")
    rng = torch.Generator().manual_seed(0)
    with open(root / "pairs.jsonl", "w") as handle:
        for _ in range(40):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (8,), generator=rng)]
            handle.write(json.dumps({"prompt": " ".join(words[:3]), "chosen": "hello world " + " ".join(words[3:6]),
                                     "rejected": "the lazy dog " + " ".join(words[5:8])}) + "\n")
    cfg = tiny_config(root, root / "tiny-model", root / "pairs.jsonl", run_name="whole", lora_dropout=0.1,
                      save_every=2, eval_every=2, health_prompts=0, save_total_limit=3)
    run(cfg)
    return root, cfg


def child(cfg, point: str) -> subprocess.CompletedProcess:
    values = dataclasses.asdict(cfg)
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(values), point], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run's"


def assert_no_debris(run_dir: Path) -> None:
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not [n for n in names if n.endswith((".tmp", ".old"))], names
    assert not (run_dir / "best.tmp").exists() and not (run_dir / "best.old").exists()


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_then_resume_ends_with_the_uninterrupted_adapter(world, point):
    root, whole = world
    cfg = dataclasses.replace(whole, run_name=point)
    killed = child(cfg, point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = root / "runs" / point
    run(cfg, resume=True)  # the lock died with the killed process
    assert_same_adapter(run_dir, root / "runs" / "whole")
    assert_no_debris(run_dir)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 7)), steps  # no step logged twice, none lost, no torn line left


def test_a_full_disk_is_one_line_keeps_the_last_good_checkpoint_and_the_run_resumes(world):
    root, whole = world
    cfg = dataclasses.replace(whole, run_name="full-disk")
    failed = child(cfg, "full-disk")
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "step 4" in errors[0] and "the last good checkpoint is" in errors[0] and "step-000002" in errors[0]
    assert "free on its disk" in errors[0] and "step-000004.tmp" in errors[0]  # names where it was writing
    run_dir = root / "runs" / "full-disk"
    assert latest_checkpoint(run_dir).name == "step-000002"
    assert_no_debris(run_dir)
    run(cfg, resume=True)
    assert_same_adapter(run_dir, root / "runs" / "whole")


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_saying_so(world, capsys):
    root, whole = world
    cfg = dataclasses.replace(whole, run_name="damaged")
    killed = child(cfg, "mid-accumulation")  # killed in step 5: checkpoints 2 and 4 are kept
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = root / "runs" / "damaged"
    target = run_dir / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the tensor data: the header still parses
    target.write_bytes(bytes(data))
    capsys.readouterr()
    run(cfg, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step-000004 is damaged: adapter/adapter_model.safetensors" in err
    assert "resuming from step-000002" in err
    assert_same_adapter(run_dir, root / "runs" / "whole")
