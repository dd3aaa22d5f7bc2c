"""Run directories and checkpoints: safetensors and JSON only, every write atomic.

Layout of ``runs/<name>/``::

    config.yaml            the resolved OrpoConfig
    metrics.jsonl          one JSON object per log or eval point
    checkpoints/
      step-000010/         adapter/ (peft format), optimizer.safetensors, state.json, rng.safetensors
      latest               the name of the newest complete checkpoint
    adapter/               the final adapter

A checkpoint is written into ``step-N.tmp/``, every file and directory in it fsynced, and
renamed into place only when complete; ``latest`` is then replaced atomically. A crash or a
full disk mid-write leaves at worst a ``.tmp`` directory, never a half checkpoint named as the
latest, and earlier checkpoints stay until a newer one is complete. Replacing a checkpoint of
the same step (an interrupt right after a periodic save) moves the old one to ``step-N.old``
first and deletes it only after the new one is in place; :func:`latest_checkpoint` falls back
to ``step-N.old`` if a crash fell between the two renames.

``state.json`` records the train state (completed optimizer steps, the micro-batches those
steps consumed, tokens, and the fingerprint of the training data) with the optimizer's
scalars, the scheduler and the RNG state of the last completed step's end, and the sha256 of
every other file of the checkpoint. A resume checks them (:func:`resumable_checkpoint`): a
damaged checkpoint (a flipped bit, a truncated file) is passed over, saying so, for the
newest older one that is whole. A failed save (a full disk: safetensors raises its own
``SafetensorError``, not an ``OSError``) removes its partial directory and names the last
good checkpoint; a successful one removes the ``.tmp``/``.old`` debris of earlier crashes.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.errors import TrainingError
from ..core.files import atomic_write_text, free_space, fsync_dir, fsync_tree

if TYPE_CHECKING:
    from .sharded_state import FullState, ShardedModel


@dataclass
class TrainState:
    """Where training stands, counting only completed optimizer steps.

    ``micro_batches`` and ``tokens`` grow when an optimizer step completes, never per
    micro-batch: an interrupt mid-accumulation must not skip data whose gradients never
    reached the weights. ``data_fingerprint`` identifies the tokenized training pairs.
    """

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    data_fingerprint: str = ""


# -- optimizer state <-> safetensors + JSON ---------------------------------------------------

def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready values.

    Keys are ``"<param index>.<slot>"``; a nested slot (bitsandbytes' 8-bit optimizers keep
    theirs under ``__bnb_optimizer_quant_state__``) continues with ``/<name>`` per level.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # safetensors stores no shared memory
                tensor = tensor.clone()  # (bitsandbytes shares one quantisation map between params)
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[key] = tensor
        elif isinstance(value, dict):
            if not value:
                scalars[key] = {}
            for name, item in value.items():
                visit(f"{key}/{name}", item)
        else:
            scalars[key] = value

    for index, slots in state_dict["state"].items():
        for name, value in slots.items():
            visit(f"{index}.{name}", value)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, path = key.split(".", 1)
        *parents, name = path.split("/")
        slot = state.setdefault(int(index), {})
        for parent in parents:
            slot = slot.setdefault(parent, {})
        slot[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# -- RNG ----------------------------------------------------------------------------------------

@dataclass
class RngSnapshot:
    """The RNG state at one moment (a step's end), saved with the checkpoint of that step."""

    tensors: dict[str, torch.Tensor]
    python: list

    @classmethod
    def capture(cls) -> RngSnapshot:
        return cls(_rng_tensors(), list(random.getstate()))


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


# -- save / load ---------------------------------------------------------------------------------

def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    if (path / "state.json").is_file():
        return path
    old = path.with_name(path.name + ".old")  # a crash between the two renames of a same-step replacement
    return old if (old / "state.json").is_file() else None


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    keep: int = 2,
    rng: RngSnapshot | None = None,
    full: FullState | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step``, point ``latest`` at it, keep the newest ``keep``.

    ``rng`` is the RNG state to restore on resume (default: now); an interrupted step passes
    the snapshot of the last completed step's end. ``full``: the whole LoRA weights and
    optimizer state of a sharded (FSDP2) model, gathered by every rank
    (``sharded_state.ShardedModel.full_state``), written in the same format. Raises :class:`TrainingError` (naming the
    last good checkpoint) if the write fails, for example on a full disk; the partial
    directory is removed.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    final, tmp, old = root / name, root / (name + ".tmp"), root / (name + ".old")
    rng = rng or RngSnapshot.capture()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if full is None:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
        else:  # peft keeps the adapter's entries of the gathered state dict, as it does of the model's own
            model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=full.trainable)
        tensors, meta = _flatten_optimizer(optimizer.state_dict() if full is None else full.optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng.tensors, str(tmp / "rng.safetensors"))
        payload = {
            "train_state": vars(state),
            "optimizer": meta,
            "scheduler": scheduler.state_dict(),
            "python_random": rng.python,
            "sha256": _file_hashes(tmp),  # state.json is written last and vouches for the rest
        }
        atomic_write_text(tmp / "state.json", json.dumps(payload))
        fsync_tree(tmp)
        if final.exists():  # same step again: the old copy goes only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fsync_dir(root)
        atomic_write_text(root / "latest", name + "\n")
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:  # a full disk: safetensors raises its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {previous}" if previous else "no earlier checkpoint exists"
        where = getattr(exc, "filename", None) or tmp
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"{where}: could not save the checkpoint for step {state.step} ({reason}); {kept}; "
                            f"{free_space(root)} free on its disk") from exc
    _prune(root, keep_path=final, limit=keep)
    return final


def _file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (but state.json), keyed by its relative path."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "state.json"):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return hashes


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (a missing, truncated or changed file), or None.

    Checks every file against the sha256 that ``state.json`` records; a checkpoint written
    before the hashes were recorded has its safetensors headers read instead.
    """
    try:
        payload = json.loads((path / "state.json").read_text(encoding="utf-8"))
        hashes = payload.get("sha256")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"state.json is unreadable ({exc})"
    if not isinstance(hashes, dict):  # an older checkpoint: at least the files must parse
        for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            try:
                load_file(str(path / name))
            except (OSError, SafetensorError, ValueError) as exc:
                return f"{name} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return None
    actual = _file_hashes(path)
    for name, digest in hashes.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its sha256 in state.json"
    return None


def resumable_checkpoint(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run that is whole (:func:`checkpoint_problem`), or None if it has none.

    A damaged newer one is passed over and ``say`` is told which and why; :class:`TrainingError`
    if every checkpoint kept is damaged.
    """
    root = checkpoint_dir(run_dir)
    newest = latest_checkpoint(run_dir)
    complete = sorted((p for p in root.glob("step-*") if p.is_dir() and "." not in p.name), reverse=True)
    candidates = list(dict.fromkeys([newest, *complete] if newest else complete))
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                say(f"{'; '.join(damaged)}; resuming from {path.name}, the newest whole checkpoint")
            return path
        damaged.append(f"checkpoint {path.name} is damaged: {problem}")
    if damaged:
        raise TrainingError(f"{root}: no whole checkpoint to resume from ({'; '.join(damaged)})")
    return None


def _prune(root: Path, keep_path: Path, limit: int) -> None:
    """Keep the newest ``limit`` complete checkpoints (and always ``keep_path``, the one just written).

    Also removes the ``step-N.tmp`` and ``step-N.old`` directories that a crash or a full disk
    left: with ``keep_path`` in place and ``latest`` pointing at it, nothing refers to them.
    """
    for debris in root.glob("step-*"):
        if debris.is_dir() and debris.suffix in (".tmp", ".old") and debris != keep_path:
            shutil.rmtree(debris, ignore_errors=True)
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name)
    for old in complete[: -max(1, limit)]:
        if old != keep_path:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sharded: ShardedModel | None = None,
) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return the train state.

    ``sharded``: the model is FSDP2-sharded; every rank calls this and keeps its slices.
    """
    from peft import set_peft_model_state_dict

    try:
        payload = json.loads((path / "state.json").read_text())
        adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise TrainingError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
    if sharded is not None:
        try:
            sharded.load_adapter_state(adapter)
        except KeyError as exc:
            raise TrainingError(f"{path}: adapter weights do not fit this model ({exc.args[0]})") from exc
        sharded.load_optimizer_state(optimizer, _unflatten_optimizer(optimizer_tensors, payload["optimizer"]))
    else:
        device = next(p for p in model.parameters() if p.requires_grad).device
        result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in adapter.items()})
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"{path}: adapter weights do not fit this model ({result.unexpected_keys[:3]})")
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, payload["optimizer"]))
    scheduler.load_state_dict(payload["scheduler"])
    _restore_rng(rng, payload["python_random"])
    return TrainState(**payload["train_state"])
