"""One metrics logger with sinks; console lines (``core/console.py``) go above its progress bar.

:class:`MetricsLogger` takes one record per log point (``{"step": …, "split": "train"|"eval"|…,
…}``) and hands it to each sink: ``metrics.jsonl`` always (the record as is, flushed at once
so nothing is lost on a crash), TensorBoard and W&B when ``report_to`` names them (numeric
values only, tagged ``<split>/<key>``). It also owns the progress bar, so that console lines
(:func:`console`) are written above the bar instead of through it.

TensorBoard uses ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard``
package (a dependency of this project); its event files go to ``<run>/tensorboard/``. W&B is
used only when ``wandb`` is importable; without ``WANDB_API_KEY`` it runs in offline mode
(``WANDB_MODE`` set by the user wins), so a machine without a network still logs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..config import parse_report_to
from ..core.console import console
from ..core.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once (nothing lost on a crash)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        from ..core.files import atomic_write_text

        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run replays the steps after its checkpoint: drop their old records
            # (and a torn last line, which a kill or a full disk mid-write leaves).
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a record, tagged ``<split>/<key>`` (step and split are the axes)."""
    split = str(record.get("split", "train"))
    if split == "eval" and record.get("tag"):
        split = f"eval_{record['tag']}"
    out = {}
    for key, value in record.items():
        if key in ("step", "split", "tag") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{split}/{key}"] = float(value)
    return out


class TensorBoardSink:
    """Scalars into an event file under ``<run>/tensorboard/`` that TensorBoard reads."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError(f"report_to: tensorboard needs the 'tensorboard' package ({exc})") from None
        # purge_step: a resumed run drops the events its replayed steps logged before.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The same scalars to Weights & Biases; offline unless an API key or ``WANDB_MODE`` says otherwise."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None, resume: bool):
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to: wandb is not installed (pip install wandb), or drop it from report_to") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qlora_orpo"), name=run_name, id=run_name, dir=str(run_dir),
            config=config, mode=mode, resume="allow" if resume else None,
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Every record to every sink; the progress bar and console lines of a run."""

    def __init__(
        self,
        run_dir: Path,
        report_to: str = "none",
        resume_step: int | None = None,
        config: dict[str, Any] | None = None,
    ):
        run_dir = Path(run_dir)
        self.sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl", truncate_after_step=resume_step)]
        for name in parse_report_to(report_to):
            if name == "tensorboard":
                purge = resume_step + 1 if resume_step is not None else None
                self.sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, purge_step=purge))
            elif name == "wandb":
                self.sinks.append(WandbSink(run_dir, run_dir.name, config, resume=resume_step is not None))
        self.bar: tqdm | None = None

    def log(self, record: dict[str, Any], postfix: str | None = None) -> None:
        for sink in self.sinks:
            sink.write(record)
        if postfix is not None and self.bar is not None:
            self.bar.set_postfix_str(postfix)

    def console(self, message: str) -> None:
        console(message)

    def start_progress(self, total: int, initial: int = 0, desc: str = "training") -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_progress()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``.

    A last line that is not whole JSON (a kill or a full disk in the middle of a write) is
    left out, saying so on the console; an unreadable line before it is a :class:`TrainingError`
    naming the file and line, since an append-only log cannot tear there.
    """
    from ..core.errors import TrainingError

    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number - 1 == last:
                console(f"{path}: line {number} is torn (an interrupted write); reading the {len(records)} records before it")
                break
            raise TrainingError(f"{path}, line {number}: not a JSON object")
        records.append(record)
    return records
