"""Crash-safe file writing, checksums, and bounded echoes of user input."""

from __future__ import annotations

import contextlib
import hashlib
import os
import reprlib
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from adaptnet.errors import RunDirError


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
        os.chmod(tmp, plain_mode(path))  # mkstemp's 0600 is not what a plain write leaves
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


def refuse_links(path: str | os.PathLike) -> None:
    """Refuse a run directory holding a symbolic link anywhere inside it.

    A run directory is written and read by adaptnet alone; a link in it
    (``.lock``, ``metrics.jsonl``, ``plots`` pointing elsewhere) would make a
    write truncate or fill a file outside it, or a read take another file for
    the run's. ``path`` itself may be reached through links (a ``runs`` folder
    on another disk); nothing below it is followed.

    Raises:
        RunDirError: naming the links found and the fix.
    """
    links = []
    for root, dirs, files in os.walk(path, followlinks=False):
        links += [os.path.join(root, n) for n in (*dirs, *files)
                  if os.path.islink(os.path.join(root, n))]
    if links:
        shown_links = ", ".join(f"{p} -> {os.readlink(p)}" for p in links[:3])
        raise RunDirError(f"{path} holds symbolic links ({shown_links}"
                          f"{f' and {len(links) - 3} more' if len(links) > 3 else ''}); a run "
                          "directory is written and read by adaptnet alone and follows no "
                          "link. Remove them, or give another run directory.")


def umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(current)
    return current


def plain_mode(path: Path, directory: bool = False) -> int:
    """The permissions a plain write of ``path`` leaves: an existing file's own, else the
    umask's (``0o666`` for a file, ``0o777`` for a directory, less the umask)."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return (0o777 if directory else 0o666) & ~umask()


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60
_REPR.maxlong = 40


def short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: messages never echo large input whole."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: object, limit: int = 80) -> str:
    """A ``repr`` of user input short enough for an error message (never the whole input)."""
    return short(_REPR.repr(value), limit)
