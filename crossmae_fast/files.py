"""File helpers every layer may use (this module imports nothing of the package): the one atomic write,
the one way a tool words an output it cannot write, and the one safe read of a torch file."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """An output that cannot be written (no permission, a read-only file system, a full disk): `filename`
    is the path the caller meant to write, `errno` / `strerror` the system's reason."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: [Errno {self.errno}] {self.strerror}"


WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
"""The errnos of an output that cannot be written (a folder in the way counts: ENOTDIR, EEXIST)."""


def error_line(e: OSError) -> str:
    """One line for a failed file operation, naming the path and the errno (`cannot write
    runs/x/checkpoint-00000004.pt: [Errno 28] No space left on device`)."""
    if isinstance(e, WriteError) or e.errno is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    what = "cannot write " if e.errno in WRITE_ERRNOS else ""
    name = f"{what}{e.filename}: " if e.filename is not None else what
    return f"{name}[Errno {e.errno}] {e.strerror}"


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn any OSError raised inside into a `WriteError` naming `path` (the file the caller writes, not a
    temporary name) with the same errno."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # torch.save may wrap the OSError of a full disk in a RuntimeError
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause.errno is None:
            raise
        raise WriteError(cause.errno, cause.strerror or str(cause), str(path)) from None


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object],
                 mode: int | None = None) -> Path:
    """Write `content` (bytes, text as UTF-8, or a function that writes to a binary file) to `path` so that
    a reader sees the old file or the new one, never part of one, even after a crash or power loss: a
    temporary file in the same folder, fsync, rename over `path`, fsync the folder. `mode`: permission
    bits of the new file (default: those of a plain `open`). A failure raises `WriteError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        _write_replace(path, tmp, content, mode)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def _write_replace(path: Path, tmp: Path, content, mode: int | None) -> None:
    """Write `tmp`, fsync it and rename it over `path`; `tmp` never outlives a failure."""
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def read_weights(path: str | os.PathLike, what: str) -> object:
    """The torch file `path` (a `what`: "checkpoint", "probe file", ...) read with `weights_only=True` onto
    the CPU; FileNotFoundError / ValueError naming the file when it is missing or cannot be read so."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e
