"""What the launcher (``torchrun``, ``accelerate launch``) told this process through its environment.

Read both by the model loader (an FSDP2 run stores 4-bit weights in the compute dtype so
that a layer's parameters can be flattened) and by ``training/distributed.py``.
"""

from __future__ import annotations

import os

SHARDING = ("ddp", "fsdp2")


def sharding_from_env() -> str:
    """``fsdp2`` when an accelerate FSDP config launched this process, else ``ddp``."""
    return "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"
