"""The peer row: TRL's ORPO loss path (``ORPOTrainer.get_batch_loss_metrics``) on our batch.

The training loop, data pipeline and optimizer of ``transformers.Trainer`` are not used, so
the benchmark's rows differ only in the loss path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.collate import PairBatch

TRL_MISSING = "trl is not installed (install the bench extra: pip install -e '.[bench]'); TRL row skipped"


def peer_missing_reason() -> str | None:
    """None when trl can be imported, else why its rows are skipped."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return TRL_MISSING
    return None


def trl_inputs(batch: PairBatch) -> dict[str, torch.Tensor]:
    """Our batch under the keys TRL's ORPO collator produces (``DPODataCollatorWithPadding``).

    TRL's ``*_labels`` are the input ids with the prompt and padding set to -100, which is
    our ``labels``; its NLL covers every attended token, which it derives from the mask.
    """
    inputs = {}
    for name, side in (("chosen", batch.chosen), ("rejected", batch.rejected)):
        inputs[f"{name}_input_ids"] = side.input_ids
        inputs[f"{name}_attention_mask"] = side.attention_mask
        inputs[f"{name}_labels"] = side.labels
    return inputs


def trl_trainer(model: torch.nn.Module, tokenizer, beta: float, max_length: int, output_dir: str | Path):
    """TRL's ``ORPOTrainer`` around ``model`` as it is (no peft config, no re-preparation).

    The constructor requires a training set; one placeholder row is given and never used.
    ``gradient_checkpointing=False`` only stops the constructor from touching the model's
    checkpointing, which ``model.load_model_for_training`` has already set up.
    Raises ImportError when trl is not installed.
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    device = next(model.parameters()).device
    args = ORPOConfig(
        output_dir=str(output_dir), beta=beta, max_length=max_length, report_to="none",
        gradient_checkpointing=False, bf16=False, remove_unused_columns=False, disable_dropout=True,
        use_cpu=device.type == "cpu",
    )
    placeholder = Dataset.from_list([{"prompt": "Hello", "chosen": " world", "rejected": " there"}])
    return ORPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)


def trl_loss(trainer, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's ORPO loss of ``batch`` (with grad) and its metrics renamed to ours.

    TRL's metric ``log_odds_ratio`` is the mean of log sigmoid(ratio), i.e. minus our
    ``or_loss``; its ``log_odds_chosen`` is the mean log-odds ratio, our ``log_odds_ratio``.
    """
    loss, metrics = trainer.get_batch_loss_metrics(model, trl_inputs(batch), train_eval="train")
    return loss, {
        "nll": metrics["nll_loss"],
        "or_loss": -metrics["log_odds_ratio"],
        "log_odds_ratio": metrics["log_odds_chosen"],
        "reward_margin": metrics["rewards/margins"],
    }
