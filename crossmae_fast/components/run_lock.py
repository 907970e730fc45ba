"""One process at a time per run folder: an OS-level lock (`fcntl.flock`) on `OUT/.lock`, held for the
life of the run and released by the kernel on any exit, `kill -9` included (no stale lock to clean up).
The holder writes its pid into the file; a second process that finds the folder taken fails at once
with `RunFolderBusy` naming that pid, before it reads or writes anything of the run. Under DDP only
the main rank takes the lock and the others learn its outcome (`hold_run_folder`).

    with hold_run_folder(out, is_main):   # pretrain, finetune, evaluate --out
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from crossmae_fast.components import distributed
from crossmae_fast.files import writing

LOCK_NAME = ".lock"


class RunFolderBusy(ValueError):
    """The run folder is held by another process (a ValueError: the tools' one-line, exit-2 path)."""


class RunLock:
    """`with RunLock(folder):` holds `folder/.lock` (creating the folder) or raises `RunFolderBusy`.
    Not re-entrant: one holder per folder and process."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        with writing(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"{self.folder} is in use by process {holder} (another run or evaluation "
                                "writing there); wait for it to end or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, is_main: bool = True) -> Iterator[None]:
    """Hold `folder` for the block: the main rank takes its `RunLock`, every rank raises `RunFolderBusy`
    when that fails (so DDP ranks share their run's lock and no rank starts alone)."""
    lock, error = RunLock(folder), None
    if is_main:
        try:
            lock.acquire()
        except (RunFolderBusy, OSError) as e:
            error = e
    error = distributed.broadcast_object(error)
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()
