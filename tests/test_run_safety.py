"""Run directories, checkpoints, the metrics log and the best checkpoint under faults (issue 20).

Each test pins a defect that a code read found, and failed before its fix. Whole runs under
kill -9 and a full disk are in ``test_faults.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError

from qlora_orpo.config import OrpoConfig
from qlora_orpo.core.errors import ConfigError, TrainingError, UserError
from qlora_orpo.training import checkpoint as C
from qlora_orpo.training.metrics import JsonlSink, read_metrics


class Model(torch.nn.Module):
    """All a checkpoint needs of a model: ``save_pretrained`` of its weights."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4.0))

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        save_file({"w": self.w.detach()}, str(path / "adapter_model.safetensors"))


def parts():
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters())
    model.w.grad = torch.ones(4)
    optimizer.step()  # optimizer state with tensors in it
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# -- checkpoints ------------------------------------------------------------------------------


def test_a_safetensors_write_error_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = parts()
    C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=2))
    real = C.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "step-000003" in str(filename):  # safetensors' own error type, not an OSError
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(C, "save_file", full_disk)
    with pytest.raises(TrainingError) as caught:
        C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=3))
    message = str(caught.value)
    assert "\n" not in message and "step 3" in message and "No space left on device" in message
    assert "the last good checkpoint is" in message and "step-000002" in message and "free on its disk" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]


def test_a_successful_save_removes_the_debris_of_earlier_crashes(tmp_path):
    model, optimizer, scheduler = parts()
    C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=1))
    root = tmp_path / "checkpoints"
    (root / "step-000002.tmp" / "adapter").mkdir(parents=True)  # a kill mid-write
    (root / "step-000001.old").mkdir()  # a kill between the two renames of a replacement
    C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=2))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


def flip_a_bit(path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # in the tensor data, so the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "missing"])
def test_a_damaged_checkpoint_gives_way_to_the_previous_one_saying_so(tmp_path, damage):
    model, optimizer, scheduler = parts()
    for step in (2, 4):
        C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=step))
    target = tmp_path / "checkpoints" / "step-000004" / "optimizer.safetensors"
    if damage == "bit flip":
        flip_a_bit(target)
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-5])
    else:
        target.unlink()
    said = []
    assert C.resumable_checkpoint(tmp_path, said.append).name == "step-000002"
    assert len(said) == 1 and "step-000004 is damaged: optimizer.safetensors" in said[0] and "step-000002" in said[0]
    flip_a_bit(tmp_path / "checkpoints" / "step-000002" / "rng.safetensors")
    with pytest.raises(TrainingError, match="no whole checkpoint to resume from"):
        C.resumable_checkpoint(tmp_path, said.append)


def test_an_undamaged_checkpoint_resumes_silently(tmp_path):
    model, optimizer, scheduler = parts()
    C.save_checkpoint(tmp_path, model, optimizer, scheduler, C.TrainState(step=2))
    said = []
    assert C.resumable_checkpoint(tmp_path, said.append).name == "step-000002" and not said
    assert C.resumable_checkpoint(tmp_path / "elsewhere", said.append) is None


# -- metrics.jsonl ----------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume_saying_so(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "split": "tr')
    assert read_metrics(path) == records
    assert "line 4 is torn" in capsys.readouterr().err
    JsonlSink(path, truncate_after_step=2).write({"step": 3, "split": "train", "loss": 0.25})
    assert read_metrics(path) == [*records[:2], {"step": 3, "split": "train", "loss": 0.25}]
    # A bad line that is not the last is not a torn write: named, not skipped.
    path.write_text("not json\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(TrainingError, match=r"metrics\.jsonl, line 1"):
        read_metrics(path)


# -- best checkpoint --------------------------------------------------------------------------


def test_select_best_never_pairs_a_record_with_another_steps_weights(tmp_path, monkeypatch):
    from qlora_orpo.evaluation import selection

    model = torch.nn.Linear(3, 2)
    best = selection.BestCheckpoint(tmp_path)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert best.consider(model, 2, {"loss": 1.0}, None, None)[0]
    real = selection.atomic_write_text

    def crash_on_the_record(path, text):
        if path.name == selection.RECORD:
            raise KeyboardInterrupt  # killed between the weights and the record
        return real(path, text)

    monkeypatch.setattr(selection, "atomic_write_text", crash_on_the_record)
    with torch.no_grad():
        model.weight.fill_(4.0)
    with pytest.raises(KeyboardInterrupt):
        best.consider(model, 4, {"loss": 0.5}, None, None)
    monkeypatch.setattr(selection, "atomic_write_text", real)
    again = selection.BestCheckpoint(tmp_path, resumed_step=10)
    with torch.no_grad():
        model.weight.zero_()
    assert again.restore(model) == 2 and torch.all(model.weight == 2.0)
    # Killed between the two renames of a replacement: the old best is still read.
    again.consider(model, 6, {"loss": 0.1}, None, None)
    (tmp_path / "best").rename(tmp_path / "best.old")
    assert selection.BestCheckpoint(tmp_path, resumed_step=10).step == 6


# -- run directories --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", "..", ".", "a\\b", " x"])
def test_a_run_name_that_leaves_the_output_dir_is_refused(name):
    with pytest.raises(ConfigError, match="^run_name: .* must be a plain directory name"):
        OrpoConfig(run_name=name)
    OrpoConfig(run_name="orpo-run_1.v2")  # a plain name is fine


def test_timestamp_run_names_cannot_collide(tmp_path, monkeypatch):
    from qlora_orpo.recipes import finetune

    class Frozen:  # two runs started in the same second
        @staticmethod
        def now():
            import datetime

            return datetime.datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(finetune, "datetime", Frozen)
    cfg = OrpoConfig(output_dir=str(tmp_path))
    first, second = finetune.resolve_run_dir(cfg, False), finetune.resolve_run_dir(cfg, False)
    assert first.name == "orpo-20260102-030405" and second.name == "orpo-20260102-030405-2"
    assert first.is_dir() and second.is_dir()


def test_a_second_process_cannot_take_a_run_directory_in_use(tmp_path):
    from qlora_orpo.core.runlock import RunLock

    holder = textwrap.dedent(f"""
        import sys, time
        from qlora_orpo.core.runlock import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another run is training in this directory") as caught:
            RunLock(tmp_path).acquire()
        assert "\n" not in str(caught.value)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with RunLock(tmp_path):  # released when the holder ends (a kill -9 releases it too)
        pass


def test_a_run_that_died_before_its_first_checkpoint_is_not_appended_to(tmp_path):
    from qlora_orpo.recipes.finetune import open_run
    from qlora_orpo.training.distributed import Dist

    run_dir = tmp_path / "t"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("beta: 0.1\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "split": "eval"}\n')  # no checkpoints/ yet
    with pytest.raises(UserError, match="already holds a run"):
        open_run(OrpoConfig(output_dir=str(tmp_path), run_name="t"), False, None, Dist())
