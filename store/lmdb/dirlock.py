"""Who has an LMDB data dir to itself: a server while it runs, an offline writer (upgrade, import, gc, rm,
verify --repair) while it works. Each holds an exclusive flock on `<data dir>/memsvc.lock` and writes there
what it is; another one that finds the lock held is refused with `DataDirBusy`, which names the holder.

The kernel drops the lock when its holder exits, however it exits, so a crash leaves nothing to clean up.
Readers (`sessions ls`, `show`, `stats`, `verify` without --repair, export) take no lock.

Knows files and processes; knows nothing of what the store holds.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
from pathlib import Path

from ..errors import StoreError

LOCK_FILE = "memsvc.lock"


class DataDirBusy(StoreError):
    """Another server or offline writer holds the data dir."""


class DirLock:
    """Hold path's lock until release() (or the process ends). who: what holds it, e.g. 'a memsvc server'."""

    def __init__(self, path: str | os.PathLike, who: str):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file of the data dir {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DataDirBusy(
                f"the data dir {self.path} is in use by {holder}, and {who} needs it alone: stop that one first "
                f"(or wait for it to finish); while a server runs, change sessions through its API") from None
        since = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{who} (pid {os.getpid()}, since {since})\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Idempotent. The lock file stays (its text is the last holder's)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
