"""Durable writes: a file appears whole under its name or not at all.

Every file the package writes goes through a temporary name, an fsync and a rename
(:func:`atomic_write_text`); a directory written in pieces is fsynced as a tree
(:func:`fsync_tree`) before it is renamed into place. A rename is durable only once its
directory is fsynced too (:func:`fsync_dir`). A directory that replaces an earlier one (an
adapter, an export) is written into a temporary sibling (:func:`make_temp_dir`) and exchanged
with it (:func:`replace_dir`); a failed write is one line (:func:`write_failure`).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a file's fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(directory))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


# -- directories written in pieces: a temporary sibling, then an exchange ---------------------

_TMP, _OLD = ".tmp-", ".old-"


def free_space(path: Path) -> str:
    """The free space of ``path``'s disk, for an error message ("unknown space" if it cannot be read)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_debris(target: Path) -> None:
    """Remove what a killed writer of ``target`` left beside it (its pid is in the name and dead).

    A ``.<name>.old-<pid>`` with no ``target`` is the previous directory of a writer killed
    between the two renames of the fallback in :func:`replace_dir`: it is put back, not removed.
    """
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        suffix = path.name[len(target.name) + 1:]  # ".tmp-<pid>-<random>" or ".old-<pid>"
        kind = next((k for k in (_TMP, _OLD) if suffix.startswith(k)), None)
        pid = suffix[len(kind or ""):].split("-", 1)[0]
        if kind is None or not pid.isdigit() or _pid_alive(int(pid)):
            continue  # not ours, an older name without a pid, or a writer still at work
        if kind == _OLD and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(target: Path) -> Path:
    """An empty sibling of ``target`` to write into, with the permissions a plain mkdir would give.

    Its name carries this process's pid, so that the next writer of ``target`` can tell the
    debris of a killed one (:func:`_clean_debris`) from a writer still at work.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_debris(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # the kernel or filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Replace ``target`` (if any) by the complete directory ``new``: fsynced, then renamed.

    An existing ``target`` is exchanged with ``new`` in one atomic rename where the kernel
    allows, so no moment exists without a whole ``target``; elsewhere it moves to
    ``.<name>.old-<pid>`` first, which the next writer puts back if a kill fell between the
    two renames. Files in ``new`` get the umask's permissions first: safetensors writes its
    files 0600, which would keep an adapter or an export from other users of a shared machine.
    """
    mode = 0o666 & ~_umask()
    for path in new.iterdir():
        if path.is_file():
            path.chmod(mode)
    fsync_tree(new)  # the files are on disk before any name points at them
    if target.exists() and _exchange(new, target):
        fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # now the previous directory
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}{_OLD}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_failure(target: Path, exc: BaseException, kept: str, writing: str) -> str:
    """One line for a failed write of the directory ``target``: the file, why, what is kept, free space.

    ``writing``: the file being written at the time, named when ``exc`` names none (safetensors'
    ``SafetensorError`` does not; an ``OSError`` does, and its file is named instead).
    """
    name = getattr(exc, "filename", None)
    shown = Path(name).name if name else writing
    reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"{target}: could not write {shown} ({reason}); nothing was written under that name, {kept}; "
            f"{free_space(target.parent)} free on its disk")
