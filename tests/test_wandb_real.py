"""``--report-to wandb`` with the real ``wandb`` package (the ``wandb`` extra, which ``make test`` installs).

An offline run writes everything W&B would upload into ``<run>/wandb/offline-run-*/run-<id>.wandb``:
a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs. Recent wandb releases moved their
reader into the Go core, so :func:`wandb_records` reads the log format itself (a 7-byte header,
32 KiB blocks, 7-byte record headers, records split FIRST/MIDDLE/LAST across blocks) and the
test checks what a later ``wandb sync`` would publish: the run's id and name, the resolved
config, and every scalar of ``metrics.jsonl`` at its step.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from userfeatures import pair_rows, save_tiny_model, train_flags, write_jsonl

from qlora_orpo.cli import main
from qlora_orpo.training.metrics import read_metrics

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (make test's set-up installs it)")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the importorskip on purpose)

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of an offline run's ``.wandb`` file, in order."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero fill up to the block's end
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"{path}: record type {kind} at byte {pos}"
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_an_offline_wandb_run_holds_the_resolved_config_and_every_logged_scalar(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # nothing written to the user's home
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    assert main(["train", *train_flags(model, data, tmp_path / "runs", "wbreal"), "--report-to", "wandb",
                 "--max-steps", "3", "--save-every", "0", "--eval-fraction", "0.25"]) == 0
    run_dir = tmp_path / "runs" / "wbreal"
    (log,) = run_dir.glob("wandb/offline-run-*/run-wbreal.wandb")
    records = list(wandb_records(log))

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == "wbreal" and run.display_name == "wbreal" and run.project == "qlora_orpo"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["max_steps"] == 3 and config["data"] == str(data) and config["report_to"] == "wandb"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())  # the run directory's resolved config
    assert {k: v for k, v in config.items() if k != "_wandb"} == recorded

    history: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval" and r.get("tag") == "after"]
    assert evals and history[evals[-1]["step"]]["eval_after/reward_accuracy"] == evals[-1]["reward_accuracy"]
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # run.finish() reached the log
