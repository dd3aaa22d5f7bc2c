"""What the launcher (``torchrun``, ``accelerate launch``) told this process through its environment.

Read both by the model loader (an FSDP2 run stores 4-bit weights in the compute dtype so
that a layer's parameters can be flattened) and by ``training/distributed.py``; with them,
the device the process group's collectives take their tensors on.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SHARDING = ("ddp", "fsdp2")


def sharding_from_env() -> str:
    """``fsdp2`` when an accelerate FSDP config launched this process, else ``ddp``."""
    return "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"


def collective_device() -> torch.device:
    """Where a collective's tensors must live: nccl reduces only CUDA tensors (this rank's GPU), gloo only CPU ones."""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
