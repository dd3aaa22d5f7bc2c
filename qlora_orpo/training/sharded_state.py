"""Whole tensors out of an FSDP2-sharded model, and back: what checkpoints, evaluation and the adapter need.

Under FSDP2 (``distributed.shard_fsdp2``) each parameter is a DTensor of which a rank holds
a slice, and a module's whole parameters exist only while FSDP2 has gathered them (in its
forward hooks). Files must not depend on that: a checkpoint written by a sharded run has
exactly the single-process format (peft's adapter files, an optimizer state keyed by
parameter index, ``checkpoint.py``), so it resumes in one process, under DDP or FSDP2.

Gathering uses torch's ``torch.distributed.checkpoint.state_dict`` API with full state dicts
offloaded to the CPU: these are collectives, so every rank calls them, and only rank 0
receives the tensors (the other ranks get ``{}``). Loading gives every rank the whole
tensors (each rank reads the small checkpoint files itself) and the API keeps each rank's slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

# Rank 0 alone receives the tensors, on the CPU; the frozen 4-bit base is never gathered.
_GATHER = dict(full_state_dict=True, cpu_offload=True)


@dataclass
class FullState:
    """What a checkpoint holds of the model and optimizer, whole (on rank 0; empty elsewhere)."""

    trainable: dict[str, torch.Tensor]  # parameter name (as ``named_parameters``) -> whole tensor
    optimizer: dict[str, Any]  # ``optimizer.state_dict()`` as one process would return it


class ShardedModel:
    """A peft ``model`` whose decoder layers and ``root`` (the module around it) FSDP2 shards."""

    def __init__(self, model: nn.Module, root: nn.Module):
        self.model, self.root = model, root

    # -- gathering (collectives: every rank calls these, in the same order) -------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The whole trainable (LoRA) parameters by name on rank 0, ``{}`` on the other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(**_GATHER, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with whole tensors, keyed by parameter index as in one process (rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not optimizer.state:
            # Before the first step there is nothing sharded, and the API would initialise the
            # state with a zero step (AdamW's step count 1), unlike a single process's empty state.
            return optimizer.state_dict() if torch.distributed.get_rank() == 0 else {}
        full = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(**_GATHER))
        if not full:
            return {}
        # The API keys the state and the groups' parameters by name; one process numbers the
        # parameters across the groups in order, which is what the files record.
        names = [name for group in full["param_groups"] for name in group["params"]]
        index = {name: i for i, name in enumerate(names)}
        return {
            "state": {index[name]: slots for name, slots in full["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in full["param_groups"]],
        }

    def full_state(self, optimizer: torch.optim.Optimizer) -> FullState:
        return FullState(self.trainable_state(), self.optimizer_state(optimizer))

    @contextlib.contextmanager
    def full_root(self) -> Iterator[None]:
        """The root's own parameters (embeddings, final norm, output head) whole for the block.

        FSDP2 gathers them in the root's forward hook; code that calls the model without
        going through the root (``generate``, the base fingerprint) needs them gathered by
        hand. The decoder layers still gather themselves one at a time in their own hooks.
        FSDP2 takes the first module to run a forward as its root, so a forward through
        ``root`` must come first (training's, or the evaluation's scores, which precede health).
        """
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()

    def write_whole(self, write: Callable[[dict[str, torch.Tensor]], T]) -> T | None:
        """Gather the trainable weights (every rank), then ``write(them)`` on rank 0 alone; None elsewhere.

        The root's weights are whole meanwhile: the adapter card's base fingerprint hashes the
        input embeddings.
        """
        state = self.trainable_state()
        with self.full_root():
            return write(state) if torch.distributed.get_rank() == 0 else None

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank: a decision that leads to collectives must be the same everywhere."""
        value = torch.tensor([int(flag)], dtype=torch.long)
        torch.distributed.broadcast(value, 0)
        return bool(value.item())

    # -- loading (every rank, whole tensors in) --------------------------------------------------

    def _trainable_names(self) -> dict[nn.Parameter, str]:
        return {p: n for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors, keyed by ``named_parameters`` names, into this rank's slices."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        expected = set(self._trainable_names().values())
        if set(tensors) != expected:
            raise KeyError(f"not this model's trainable parameters: {sorted(set(tensors) ^ expected)[:3]}")
        set_model_state_dict(self.model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """:meth:`load_trainable_state` from peft's saved keys (``...lora_A.weight``, no adapter name)."""
        adapter = self.model.active_adapter
        # peft's get_peft_model_state_dict drops ".<adapter name>" from each key to save it.
        saved = {name.replace(f".{adapter}", ""): name for name in self._trainable_names().values()}
        unknown = sorted(set(tensors) - set(saved))
        if unknown:
            raise KeyError(f"not this model's adapter weights: {unknown[:3]}")
        self.load_trainable_state({saved[key]: value for key, value in tensors.items()})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """Load a single-process ``optimizer.state_dict()`` (parameter indices, whole tensors)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not state_dict["state"]:  # saved before the first step: nothing to shard
            optimizer.load_state_dict(state_dict)
            return
        names_of = self._trainable_names()
        names = [names_of[p] for group in optimizer.param_groups for p in group["params"]]
        by_name = {
            "state": {names[int(i)]: slots for i, slots in state_dict["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state_dict["param_groups"]],
        }
        set_optimizer_state_dict(self.model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
