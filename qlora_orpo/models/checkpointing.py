"""``gradient_checkpointing: auto``: keep every layer's activations when they fit, recompute them when not.

Checkpointing trades a second forward of every decoder layer for memory: on this project's CPU
a step of natural HH pairs is 1.4-1.5x faster without it, for a few hundred MiB more at 512
tokens (docs/benchmarks.md); a 70B base at 2048 tokens needs it on any GPU. ``auto`` turns it
off when the activations that checkpointing would drop, for the worst micro-batch (both sides
of ``batch_size`` pairs at ``max_length`` tokens, as ``--step sequential`` holds them), take at
most :data:`HEADROOM` of the memory left after loading the model; ``--step auto``'s own
choices and its out-of-memory retry then work inside what remains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import OrpoConfig
from ..core.launcher import collective_device
from .floor import ModelShape
from .memory import available_memory_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

# Share of the free memory the kept activations may take; the rest is for the step's other
# tensors (logits chunks, LoRA gradients, AdamW states, the allocator's slack).
HEADROOM = 0.5
SETTINGS = ("auto", "on", "off")


def kept_activation_bytes(shape: ModelShape, tokens: int, activation_bytes: int, dropout: bool) -> int:
    """Bytes the decoder's layers keep for backward without checkpointing, beyond each layer's input.

    Per token and layer (elements, ``H`` hidden, ``I`` MLP width): the two RMSNorms' inputs and
    outputs (4H), attention's queries and output (2H) and keys and values (2 kv_heads x head_dim,
    as SDPA saves them), the MLP's gate, up, activation and product (4I); with LoRA dropout each
    adapted layer's dropped input (6H + I) and its one-byte mask. An upper estimate: tensors that
    autograd shares are counted once each here too.
    """
    hidden, inter = shape.hidden, shape.intermediate
    elements = 6 * hidden + 2 * shape.kv_heads * shape.head_dim + 4 * inter
    masks = 0
    if dropout:
        elements += 6 * hidden + inter
        masks = 6 * hidden + inter
    return (elements * activation_bytes + masks) * shape.layers * tokens


@dataclass(frozen=True)
class CheckpointingChoice:
    enabled: bool
    setting: str  # what was asked: auto, on or off
    kept_bytes: int = 0  # auto: the activations checkpointing would drop, worst case
    free_bytes: int = 0  # auto: the memory left after loading the model (or the budget)

    def describe(self) -> str:
        state = "on" if self.enabled else "off"
        if self.setting != "auto":
            return f"gradient checkpointing {state}"
        verdict = "over" if self.enabled else "within"
        return (f"gradient checkpointing {state} (auto: {self.kept_bytes / 2**20:,.0f} MiB of kept activations at the "
                f"worst micro-batch, {verdict} {HEADROOM:g} of {self.free_bytes / 2**20:,.0f} MiB free)")


def choose_checkpointing(
    setting: str, shape: ModelShape, max_length: int, batch_size: int, activation_bytes: int, dropout: bool,
    free_bytes: int,
) -> CheckpointingChoice:
    """``setting`` ``on``/``off`` as given; ``auto`` off when the worst micro-batch's kept activations fit."""
    if setting not in SETTINGS:
        raise ValueError(f"gradient_checkpointing: {setting!r} is not one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return CheckpointingChoice(setting == "on", setting)
    kept = kept_activation_bytes(shape, 2 * batch_size * max_length, activation_bytes, dropout)
    return CheckpointingChoice(kept > HEADROOM * free_bytes, setting, kept, free_bytes)


def checkpointing_for(cfg: OrpoConfig, model: nn.Module, device: torch.device) -> CheckpointingChoice:
    """``cfg.gradient_checkpointing`` resolved for this loaded model, its batch shape and the memory left
    (``memory_budget_mib`` when set, else what the device has free now)."""
    if cfg.gradient_checkpointing != "auto":
        return CheckpointingChoice(cfg.gradient_checkpointing == "on", cfg.gradient_checkpointing)
    free = cfg.memory_budget_mib * 2**20 or available_memory_bytes(device)
    residual = model.get_input_embeddings().weight.element_size()  # the residual stream's dtype follows it
    choice = choose_checkpointing("auto", ModelShape.from_config(model.config), cfg.max_length, cfg.batch_size,
                                  residual, cfg.lora_dropout > 0, free)
    return _agreed(choice)


def _agreed(choice: CheckpointingChoice) -> CheckpointingChoice:
    """Over several ranks, on for all if on for any: under FSDP2 a checkpointed layer gathers its
    weights again in backward, a collective every rank must join."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return choice
    flag = torch.tensor([int(choice.enabled)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return replace(choice, enabled=bool(flag.item()))
