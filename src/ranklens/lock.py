"""An exclusive lock on a directory, so two processes never write one run (or one store) at once.

The lock is ``flock`` on ``DIR/.lock``, which holds the owner's process id. The kernel drops it when the owner exits,
however it exits (``kill -9`` included), so a stale lock never blocks a rerun. A second process is refused at once
with a one-line error naming the holder's PID. (``flock`` is per open file, so one process must not lock the same
directory twice; nested jobs lock their own subdirectories.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

from ranklens.errors import RanklensError

try:
    import fcntl
except ImportError:  # Windows: no flock; jobs run unlocked there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class DirectoryLock:
    def __init__(self, directory: str | Path, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self._file: IO[bytes] | None = None

    def acquire(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.directory / LOCK_NAME, "a+b")  # noqa: SIM115 - held until release
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().decode(errors="replace").strip() or "unknown"
                f.close()
                raise RanklensError(f"{self.what} {str(self.directory)!r} is in use by process {holder} (lock "
                                    f"{LOCK_NAME}); wait for it to finish, or stop it, then rerun") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()).encode())
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()  # closing the file releases the flock

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
