"""Crash-safe file writing, run-directory locks, and bounded echoes of user input."""

from __future__ import annotations

import contextlib
import os
import reprlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from adaptnet.errors import RunDirError, RunLockedError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The data is fsynced before the rename and the directory after it, so after
    a crash ``path`` holds either the previous complete file or the new one,
    never a partial write. On an exception the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_HELD: dict[str, list] = {}  # real path -> [lock file descriptor, holders in this process]


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on directory ``path`` (created if missing).

    The lock lives on ``path/.lock``, which records the holder's process id. It
    is re-entrant within one process (a recipe run holds it, and ``fit`` inside
    takes it again) and released by the OS when the process dies, so a killed
    run never leaves a stale lock.

    Raises:
        RunDirError: ``path`` is a file or cannot be created or written.
        RunLockedError: another process holds the lock.
    """
    import fcntl  # POSIX only, like the rest of the run-directory format

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(path)
        held = _HELD.get(key)
        if held is None:
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot use {str(path)!r} as a run directory: {e.strerror or e} "
                          f"({type(e).__name__}). Give a directory you can write to."
                          ) from None
    if held is not None:
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(f"{path} is in use: another process (pid {owner}) is training "
                             "into it. Wait for it to finish, or give another run directory."
                             ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60
_REPR.maxlong = 40


def short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: messages never echo large input whole."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: object, limit: int = 80) -> str:
    """A ``repr`` of user input short enough for an error message (never the whole input)."""
    return short(_REPR.repr(value), limit)
