"""``from qlora_orpo.train import run``: the fine-tuning recipe under its original name (``recipes/finetune.py``)."""

from .recipes.finetune import run

__all__ = ["run"]
