"""qlora_orpo: ORPO preference fine-tuning of a 4-bit base with LoRA on one GPU or a laptop CPU.

The public API, imported lazily so that ``import qlora_orpo`` stays cheap (torch,
transformers and peft load only when a name that needs them is used)::

    from qlora_orpo import OrpoConfig, finetune, export_merged, load_adapter
    finetune(OrpoConfig(max_steps=10))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OrpoConfig": ("config", "OrpoConfig"),
    "finetune": ("recipes.finetune", "run"),  # not "train": that name is the submodule
    "export_merged": ("export.merged", "export_merged"),
    "load_adapter": ("export.adapters", "load_adapter"),
    "load_preferences": ("data.preferences", "load_preferences"),
    "orpo_loss": ("training.loss", "orpo_loss"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora_orpo' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)
