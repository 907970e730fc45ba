"""File helpers every layer may use (this module imports nothing of the package): the one atomic write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object],
                 mode: int | None = None) -> Path:
    """Write `content` (bytes, text as UTF-8, or a function that writes to a binary file) to `path` so that
    a reader sees the old file or the new one, never part of one, even after a crash or power loss: a
    temporary file in the same folder, fsync, rename over `path`, fsync the folder. `mode`: permission
    bits of the new file (default: those of a plain `open`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
