"""One run per run directory: an advisory lock file held while a run trains.

``fcntl.flock`` on ``<run>/.lock``: the kernel drops the lock when the process dies (kill -9
included), so a crashed run never leaves a stale lock behind, and a second process that
asks for it while the first holds it is refused at once. The file holds nothing: it is
opened in place (never replaced, since a lock lives on an inode), so the atomic-write rule
of ``files.py`` does not apply to it. On a platform without ``fcntl`` (Windows) the lock is
a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """The lock of one run directory; :meth:`acquire` raises :class:`UserError` if another process holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no advisory locks here
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path.parent}: another run is training in this directory (it holds {self.path}); "
                            "wait for it to end or choose another --run-name") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
