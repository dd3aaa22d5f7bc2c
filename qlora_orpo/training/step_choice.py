"""``--step auto``: the fastest step mode that fits the memory budget, chosen per micro-batch.

``shared`` runs each prompt once, its pairs packed into rows (``data/packing.py``), one
forward and one backward; ``sequential`` holds both sides' checkpointed activations and runs
one backward; ``split`` holds one side at a time and pays an extra no-grad forward of the
rejected side. All three give the joint loss's gradient. The choice compares the analytic
memory floor (``models/floor.py``) of the micro-batch's shape, times a measured overhead
factor, with the budget: ``shared`` when its rows fit and save tokens (at most
:data:`models.plan.SHARED_MAX_SHARE` of the two sides'), else ``sequential``, else ``split``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import row_tokens
from ..data.collate import PairBatch
from ..data.packing import assign_rows, shared_length
from ..models.floor import ModelShape, memory_floor
from ..models.memory import available_memory_bytes
from ..models.plan import shared_saves_tokens
from .step import AUTO_MODES

if TYPE_CHECKING:
    from ..config import OrpoConfig

MIB = 2**20
# Measured peak above baseline / analytic floor for the split step on the embedded model:
# 1.3 to 2.1 from 2048 down to 256 tokens (docs/benchmarks.md); the upper end, to be safe.
OVERHEAD_FACTOR = 2.1


@dataclass
class StepChooser:
    """Picks ``sequential`` or ``split`` for each micro-batch and counts the choices."""

    shape: ModelShape
    budget_bytes: int
    lora_r: int
    lora_targets: str
    chunk_size: int
    activation_bytes: int
    # Under FSDP2 every rank must run the same passes (each one gathers weights from all ranks):
    # the mode the ranks agree on (distributed.Dist.agree_on_step_mode); None: this rank's own.
    agree: Callable[[str], str] | None = None
    shared: bool = True  # consider the shared layout (needs the batch's pairs)
    pack_tokens: int = 0  # its rows, as the step packs them

    def __post_init__(self) -> None:
        self.counts: dict[str, int] = {"shared": 0, "sequential": 0, "split": 0}
        self.ceiling: str | None = None  # after an out-of-memory error: the richest mode still allowed
        self.retries: list[tuple[str, str]] = []

    def demote(self, failed: str, leaner: str) -> None:
        """A ``failed`` pass ran out of memory and is retried as ``leaner``: never choose richer again."""
        self.retries.append((failed, leaner))
        self.counts[failed] -= 1
        self.counts[leaner] += 1
        if self.ceiling is None or AUTO_MODES.index(leaner) > AUTO_MODES.index(self.ceiling):
            self.ceiling = leaner

    def predicted_bytes(self, tokens_per_side: int, sides: int) -> int:
        """Predicted peak above the loaded model of a step holding ``sides`` sequences at once."""
        targets = "all-linear" if self.lora_targets == "all-linear" else self.lora_targets.split(",")
        floor = memory_floor(self.shape, tokens_per_side, self.lora_r, targets, self.chunk_size,
                             self.activation_bytes, sequences=sides)
        return int(OVERHEAD_FACTOR * floor.step_bytes)

    def __call__(self, batch: PairBatch) -> str:
        rows = batch.size
        length = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])
        mode = "sequential" if self.predicted_bytes(length, 2 * rows) <= self.budget_bytes else "split"
        if self.shared and batch.pairs:
            packed = assign_rows(batch.pairs, self.pack_tokens)
            width = max(sum(shared_length(batch.pairs[i]) for i in row) for row in packed)
            # Shared only where it saves tokens: with a short prompt, one row of prompt + both
            # replies costs more attention than two sides and saves almost nothing (2048-token
            # sides: 1.56x slower, 95 MiB more than sequential; docs/benchmarks.md).
            saves = shared_saves_tokens(width, len(packed), rows, length)
            if saves and self.predicted_bytes(width, len(packed)) <= self.budget_bytes:
                mode = "shared"
        if self.ceiling is not None and AUTO_MODES.index(mode) < AUTO_MODES.index(self.ceiling):
            mode = self.ceiling
        if self.agree is not None:
            mode = self.agree(mode)
        self.counts[mode] += 1
        return mode

    def describe(self) -> str:
        used = ", ".join(f"{mode} {n}" for mode, n in self.counts.items() if n)
        text = f"step auto (budget {self.budget_bytes / MIB:,.0f} MiB): {used or 'no micro-batch yet'}"
        if self.retries:
            text += (f"; {len(self.retries)} out-of-memory retr{'y' if len(self.retries) == 1 else 'ies'} "
                     f"({', '.join(f'{a}->{b}' for a, b in self.retries)}), at most {self.ceiling} since")
        return text


def chooser_for(cfg: OrpoConfig, model, device: torch.device, agree: Callable[[str], str] | None = None):
    """The per-micro-batch chooser of ``--step auto`` for this model, device and budget (``agree``: FSDP2's)."""
    budget = cfg.memory_budget_mib * MIB or available_memory_bytes(device)
    return StepChooser(
        shape=ModelShape.from_config(model.get_base_model().config), budget_bytes=budget, lora_r=cfg.lora_r,
        lora_targets=cfg.lora_targets, chunk_size=cfg.logits_chunk_size,
        activation_bytes=model.get_input_embeddings().weight.element_size(), agree=agree,
        pack_tokens=row_tokens(cfg),
    )
