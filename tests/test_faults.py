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
import random
import signal
import subprocess
import sys
import time
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
import json, os, resource, signal, sys, time
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
    if point == "inside-the-first-checkpoint" and "step-000002" in filename:  # nothing to resume from yet
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

import qlora_orpo.export.adapters as A
real_save_adapter = A.save_adapter
def save_adapter(*args, **kwargs):
    if point == "full-disk-adapter":  # the end-of-training adapter save, every checkpoint written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    saved = real_save_adapter(*args, **kwargs)
    if point == "started-marker":  # the adapter is saved: what follows (the plots) is not training
        Path(sys.argv[3] + ".end").write_text(repr(time.time()))
    return saved
A.save_adapter = save_adapter

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
    if point == "started-marker" and calls[0] == 1:  # training has begun: the parent's clock starts
        Path(sys.argv[3]).write_text(repr(time.time()))
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

if point.startswith("full-disk"):
    from qlora_orpo.config import OrpoConfig
    from qlora_orpo.cli import main
    config = Path(cfg_values["output_dir"]).parent / "child-config.yaml"
    OrpoConfig(**cfg_values).to_file(config)
    sys.exit(main(["train", "--config", str(config)]))
from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import UserError
from qlora_orpo.recipes.finetune import run
run(OrpoConfig(**cfg_values))
"""

POINTS = ["inside-the-first-checkpoint", "inside-checkpoint-write", "before-the-record", "before-the-pointer", "during-evaluation",
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


def test_a_full_disk_at_the_final_adapter_is_one_line_and_the_resume_writes_it(world):
    root, whole = world
    cfg = dataclasses.replace(whole, run_name="full-disk-adapter")
    failed = child(cfg, "full-disk-adapter")
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    run_dir = root / "runs" / "full-disk-adapter"
    assert errors[0].startswith(f"error: {run_dir / 'adapter'}: could not write ") and "free on its disk" in errors[0]
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".adapter*"))
    assert latest_checkpoint(run_dir).name == "step-000006"
    run(cfg, resume=True)  # nothing left to train: the final evaluation and the adapter
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


def started_child(cfg, marker: Path) -> subprocess.Popen:
    """The child, uninterrupted but for the parent: it touches ``marker`` when its first micro-batch runs."""
    values = json.dumps(dataclasses.asdict(cfg))
    return subprocess.Popen([sys.executable, "-c", CHILD, values, "started-marker", str(marker)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(marker: Path, process: subprocess.Popen) -> None:
    """Wait until the child has started training (it must not exit first)."""
    while not marker.exists():
        assert process.poll() is None, f"the child exited ({process.returncode}) before training"
        time.sleep(0.005)


RANDOM_TRIALS = 3


def test_a_kill_at_a_random_moment_then_resume_ends_with_the_uninterrupted_adapter(world):
    """SIGKILL from outside after a seeded random delay within the training's own duration.

    The named points above are where the code is most fragile; this one lands wherever the
    clock says (a tensor write, a fsync, the optimizer, the metrics file, the adapter save),
    with a checkpoint every step so that most kills land beside one. The delays are stratified
    (one uniform draw in each third of the duration) so that a few trials cover the whole run. The training duration is
    measured once on an uninterrupted child (whose adapter must also equal the reference run's,
    since checkpointing every step changes no arithmetic), from its first micro-batch to its exit.
    """
    root, whole = world
    base = dataclasses.replace(whole, save_every=1, save_total_limit=2)
    measure = dataclasses.replace(base, run_name="random-measure")
    marker = root / "random-measure.started"
    process = started_child(measure, marker)
    assert process.wait(timeout=600) == 0
    duration = float(Path(f"{marker}.end").read_text()) - float(marker.read_text())
    assert_same_adapter(root / "runs" / "random-measure", root / "runs" / "whole")

    rng = random.Random(20)
    outcomes = []
    for trial in range(RANDOM_TRIALS):
        delay = duration * (trial + rng.random()) / RANDOM_TRIALS  # stratified: one draw per third of the run
        cfg = dataclasses.replace(base, run_name=f"random-{trial}")
        run_dir = root / "runs" / cfg.run_name
        marker = root / f"{cfg.run_name}.started"
        process = started_child(cfg, marker)
        wait_for(marker, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)  # a no-op if it has already exited
        code = process.wait(timeout=600)
        stage = "adapter written" if (run_dir / "adapter").is_dir() else "adapter not yet written"
        if code == 0:  # the delay outlasted this child's training: nothing to resume
            outcomes.append((trial, round(delay, 2), "finished first"))
        elif latest_checkpoint(run_dir) is None:  # killed before the first checkpoint was whole
            run(cfg, resume=True)  # starts it over from step 0 with its recorded config
            outcomes.append((trial, round(delay, 2), "killed before the first checkpoint; started over"))
        else:
            assert code == -signal.SIGKILL
            latest = latest_checkpoint(run_dir).name
            run(cfg, resume=True)
            outcomes.append((trial, round(delay, 2), f"killed after {latest}, {stage}; resumed"))
        assert_same_adapter(run_dir, root / "runs" / "whole")
        assert_no_debris(run_dir)
        assert not list(run_dir.glob(".adapter*")), "a killed adapter save left its temporary directory"
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
        assert steps == list(range(1, 7)), steps
    print(f"training took {duration:.2f} s; trials: {outcomes}")
