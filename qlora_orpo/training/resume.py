"""Resuming a run without losing or repeating data: allowed overrides, the data check, atomic steps.

* :func:`resume_config`: a resumed run trains with its own recorded ``config.yaml``; the
  fields in :data:`RESUMABLE_FIELDS` (how long to run, how often to evaluate, save and log,
  where metrics go) may be changed on resume and each change is reported. Any other field
  given with a different value is an error naming it, because it would change what the
  checkpoint's weights and optimizer state mean (data, lengths, model, LoRA shape, loss).
* :func:`data_fingerprint`: sha256 over the tokenized training pairs, so a resume on changed
  data (another file, other split or truncation settings, another tokenizer) is refused.
* :func:`deferred_interrupt`: Ctrl-C during the optimizer update (clip, step, scheduler,
  counters) is held until the update is complete, so a checkpoint never records a half-step.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import OrpoConfig
from ..core.errors import ConfigError, TrainingError
from ..data.collate import TokenizedPair

# Fields a resume may change: none of them changes what a step computes on which data.
# max_steps and epochs change the total and therefore the LR schedule's remaining decay.
RESUMABLE_FIELDS = (
    "max_steps", "epochs", "eval_every", "save_every", "log_every", "save_total_limit", "report_to", "export",
    "eval_cache",
)
# Fields that name where the run is, not what it does.
LOCATION_FIELDS = ("output_dir", "run_name")


def resume_config(run_dir: Path, given: dict[str, Any]) -> tuple[OrpoConfig, list[str]]:
    """The run's recorded config with ``given``'s resumable fields applied, and one line per change.

    ``given`` holds only the values the user set (flags, a config file, API keywords); a value
    equal to the recorded one is no change. Raises :class:`ConfigError` for any other field.
    """
    from dataclasses import fields

    from ..config.aliases import normalise_keys

    path = Path(run_dir) / "config.yaml"
    given = normalise_keys(given, {f.name for f in fields(OrpoConfig)}, "--resume")
    recorded = OrpoConfig.read_file(path)
    base = OrpoConfig(**recorded)
    wanted = OrpoConfig.from_dict({**recorded, **given}, source="--resume")  # validates and normalises
    changes: list[str] = []
    refused: list[str] = []
    for name in given:
        old, new = getattr(base, name), getattr(wanted, name)
        if name in LOCATION_FIELDS or old == new:
            continue
        if name in RESUMABLE_FIELDS:
            changes.append(f"{name}: {old!r} -> {new!r}")
        else:
            refused.append(f"{name} ({old!r} in the run, {new!r} given)")
    if refused:
        raise ConfigError(
            f"--resume: {path} fixes {', '.join(refused)}; a resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)} (start a new run for the rest)"
        )
    return wanted, changes


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the training pairs' token ids, in order (covers file, split, truncation, tokenizer)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(b"".join(i.to_bytes(4, "little", signed=True) for i in ids))
    return digest.hexdigest()


def check_data_fingerprint(recorded: str, current: str, source: str, checkpoint: Path) -> None:
    """Refuse a resume whose training pairs differ from the checkpoint's (an old checkpoint records none)."""
    if recorded and recorded != current:
        raise TrainingError(
            f"--resume: the training data in {source} differs from what {checkpoint} was trained on "
            f"(fingerprint {current[:12]} vs {recorded[:12]}); restore that data or start a new run"
        )


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT for the duration of the block; after it, hand one that came to the handler in place before.

    That handler is Python's (raise :class:`KeyboardInterrupt`) unless an outer block holds
    SIGINT itself (``distributed.Dist.interrupts_at_micro_batch_ends`` under FSDP2); any other
    setting also gets KeyboardInterrupt. Only the main thread can install signal handlers;
    elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)
    elif received:
        raise KeyboardInterrupt
