"""The one console function every command prints through (stderr, above any progress bar)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm


def console(message: str, prefix: str = "") -> None:
    """Write one line to stderr; ``tqdm.write`` keeps an open progress bar intact below it."""
    tqdm.write(f"{prefix}: {message}" if prefix else message, file=sys.stderr)
    sys.stderr.flush()


def console_logger(prefix: str = "") -> Callable[[str], None]:
    """A ``log(message)`` function for one module, with the module's prefix (``export: …``)."""
    return lambda message: console(message, prefix)
