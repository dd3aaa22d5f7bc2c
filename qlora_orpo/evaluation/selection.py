"""Best-checkpoint selection: the lowest held-out ORPO loss among checkpoints whose generation is healthy.

The ORPO paper keeps the checkpoint with the lowest evaluation loss. The loss alone can
prefer a model whose greedy replies no longer end or loop (a strong odds-ratio term pushes
the rejected tokens down until generation degenerates), so a candidate must first pass
``health.health_gate`` against the base. The best candidate's LoRA weights (the trainable
parameters only, a few MB) are written to ``<run>/best/`` as safetensors with a JSON record, so
a resumed run still knows its best; at the end of the run they are copied back into the model
and become the shipped adapter.

Crash-safe order: a new best is written whole into ``best.tmp/`` (weights, then the record,
each fsynced), the current ``best/`` is renamed to ``best.old/``, ``best.tmp/`` to ``best/``,
and ``best.old/`` is removed. A record is therefore never paired with another step's weights,
and a crash between the two renames leaves ``best.old/``, which is read instead.

Under FSDP2 every rank runs the evaluation and calls :meth:`BestCheckpoint.consider` and
:meth:`~BestCheckpoint.restore` with the ``sharded_state.ShardedModel``: the weights are
gathered (a collective) for rank 0 to write, and restored into each rank's slices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.files import atomic_write_text, fsync_dir, fsync_tree
from .health import health_gate

if TYPE_CHECKING:
    from ..training.sharded_state import ShardedModel

WEIGHTS = "adapter_weights.safetensors"
RECORD = "best.json"


class BestCheckpoint:
    """Remembers the best healthy candidate of a run in ``run_dir/best``."""

    def __init__(self, run_dir: Path, resumed_step: int = 0):
        self.dir = Path(run_dir) / "best"
        self.record: dict[str, Any] | None = None
        old = self.dir.with_name("best.old")
        if not (self.dir / RECORD).is_file() and (old / RECORD).is_file():
            old.replace(self.dir)  # a crash fell between the two renames of _save: the old best stands
        path = self.dir / RECORD
        if path.is_file() and (self.dir / WEIGHTS).is_file():
            record = json.loads(path.read_text())
            # A best found after the checkpoint a run resumes from will be found again when
            # training replays those steps; an older one still counts.
            if record.get("step", 0) <= resumed_step:
                self.record = record

    @property
    def step(self) -> int | None:
        return None if self.record is None else int(self.record["step"])

    def consider(
        self, model: torch.nn.Module, step: int, metrics: dict[str, float], health: dict[str, float] | None,
        base_health: dict[str, float] | None, sharded: ShardedModel | None = None,
    ) -> tuple[bool, str]:
        """Keep ``model``'s weights if it is healthy and its held-out loss is the lowest so far; ``(kept, why)``.

        Without health figures (``health_prompts`` 0) every candidate is eligible.
        """
        kept, why = self._judge(step, metrics, health, base_health)
        if sharded is not None:
            kept = sharded.agree(kept)  # rank 0's figures decide: keeping gathers, a collective
        if kept:
            self._save(model, {"step": step, "loss": float(metrics["loss"]),
                               "reward_accuracy": metrics.get("reward_accuracy"), "health": health}, sharded)
        return kept, why

    def _judge(self, step: int, metrics: dict[str, float], health: dict[str, float] | None,
               base_health: dict[str, float] | None) -> tuple[bool, str]:
        if health is not None and base_health is not None:
            passes, why = health_gate(base_health, health)
            if not passes:
                return False, f"step {step} is not eligible: {why}"
        loss = float(metrics["loss"])
        if self.record is not None and loss >= self.record["loss"]:
            return False, f"step {step}: held-out loss {loss:.4f}, best stays step {self.step} ({self.record['loss']:.4f})"
        return True, f"step {step} is the best so far (held-out loss {loss:.4f})"

    def _save(self, model: torch.nn.Module, record: dict[str, Any], sharded: ShardedModel | None) -> None:
        from safetensors.torch import save_file

        if sharded is not None:
            tensors = sharded.trainable_state()  # every rank gathers; rank 0 alone gets the tensors and writes
            if torch.distributed.get_rank() != 0:
                self.record = record
                return
        else:
            tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tmp, old = self.dir.with_name("best.tmp"), self.dir.with_name("best.old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS))
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
        fsync_tree(tmp)
        if self.dir.exists():  # replaced as a whole: weights and record never from two steps
            shutil.rmtree(old, ignore_errors=True)
            self.dir.rename(old)
        tmp.rename(self.dir)
        fsync_dir(self.dir.parent)
        shutil.rmtree(old, ignore_errors=True)
        self.record = record

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, sharded: ShardedModel | None = None) -> int | None:
        """Copy the best weights back into ``model``'s trainable parameters; returns their step (None: no best)."""
        if self.record is None:
            return None
        from safetensors.torch import load_file

        saved = load_file(str(self.dir / WEIGHTS))
        if sharded is not None:  # every rank reads the file and keeps its slices
            sharded.load_trainable_state(saved)
            return self.step
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != params.keys():
            raise RuntimeError(f"{self.dir / WEIGHTS}: its tensors do not match this model's trainable parameters")
        for name, param in params.items():
            param.copy_(saved[name].to(device=param.device, dtype=param.dtype))
        return self.step
