"""Errors whose message is the whole story for the user: the CLI prints them on one line, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Base of every error caused by input the user can fix (config, data, model path, disk)."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the field."""


class DataError(UserError, ValueError):
    """Bad preference data. The message names the file, the row (1-based) and the field where known."""

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, message
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ModelError(UserError):
    """A model or tokenizer that cannot be loaded or used for training."""


class AdapterError(UserError):
    """An adapter directory that is missing a file or holds one that cannot be read; names the file."""


class AdapterMismatchError(AdapterError):
    """The adapter was trained on another base; ``fields`` lists the fingerprint fields that differ."""

    def __init__(self, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.fields = list(fields or [])


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, a failed checkpoint write)."""


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a command-line entry point: a :class:`UserError` becomes one ``error: …`` line on
    stderr and exit code 2, Ctrl-C exit code 130. Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
